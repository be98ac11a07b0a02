//! What went wrong with one attempt of a request, in words: [`Problem`].
//!
//! Every failed attempt is classified once, here: *not found* (an answer), *transient*
//! (retried: 5xx, 429, 408, a refused or broken connection, a timeout) or *permanent*
//! (every other answer: 403, 400, …). The description names what the endpoint did in
//! words — "refused the connection", "answered 503 Service Unavailable with no
//! explanation", "answered 503 Service Unavailable: ServiceUnavailable: Could not reach
//! quorum of 2 …" with the XML of an S3 error body reduced to its code and message,
//! entities decoded and cut to [`DETAIL_MAX`] characters — and the hint says what to try.
//!
//! `object_store` keeps its HTTP status errors private; with its own retries off, the
//! status and body of a failed answer are read from its error text (`Server returned
//! non-2xx status code: 503 Service Unavailable: <body>`). The unit tests below run
//! object_store against canned answers, so a release that words this differently fails
//! them rather than silently making every answer permanent.

use std::error::Error as StdError;

use object_store::client::{HttpError, HttpErrorKind};

/// The longest server explanation quoted in an error line, in characters.
pub const DETAIL_MAX: usize = 240;

/// How an attempt failed, for the retry loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// The object (or the bucket) does not exist: an answer, not a failure of the store.
    NotFound,
    /// Worth trying again, here or on another endpoint.
    Transient,
    /// An answer that another attempt would repeat.
    Permanent,
}

/// One failed attempt, described.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub class: Class,
    /// What the endpoint did, to follow its URL: "refused the connection (nothing
    /// listens there)".
    pub what: String,
    /// What to try.
    pub hint: &'static str,
    /// Whether the endpoint answered (an HTTP status), as opposed to a failure to
    /// connect or to finish the exchange.
    pub answered: bool,
}

const HINT_UNREACHABLE: &str = "check that the S3 service runs there and is reachable; \
     with a cluster, list several of its nodes in --s3-endpoint";
const HINT_UNAVAILABLE: &str = "the store is overloaded or some of its nodes are down: \
     check its nodes and logs, or allow longer with --s3-retry-timeout";
const HINT_QUORUM: &str = "too few of the cluster's nodes answer to store or read the object: \
     bring the nodes back, or allow longer with --s3-retry-timeout";
const HINT_SERVER: &str = "the store failed: check its logs, or allow longer with --s3-retry-timeout";
const HINT_SLOW: &str = "the store or the network is stalled or very slow: check them, \
     or allow longer with --s3-retry-timeout";
const HINT_ACCESS: &str = "check that the key (AWS_ACCESS_KEY_ID) may read, write, list and \
     delete objects in this bucket";
const HINT_SECRET: &str = "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and that this \
     host's clock is right";
const HINT_REGION: &str = "check AWS_REGION (Garage: its s3_region; MinIO: us-east-1)";
const HINT_BUCKET: &str = "check the bucket name in --repo, and that the bucket exists";
const HINT_OTHER: &str = "check the endpoint, the bucket and the credentials";

impl Problem {
    fn new(class: Class, what: impl Into<String>, hint: &'static str) -> Self {
        let what = what.into();
        Problem { class, answered: what.starts_with("answered"), what, hint }
    }

    /// An attempt that got no answer within `limit`.
    pub fn timed_out(limit: std::time::Duration) -> Self {
        Problem::new(Class::Transient, format!("did not answer within {} s", limit.as_secs()), HINT_SLOW)
    }

    /// An answer longer than any this client expects (`max` bytes): not read further.
    pub fn too_long(max: usize) -> Self {
        Problem::new(Class::Permanent, format!("answered with more than {} MiB", max >> 20), HINT_OTHER)
    }

    /// Classifies an error of `object_store` (made with its own retries off, so it is
    /// the outcome of exactly one HTTP exchange).
    pub fn of_store(e: &object_store::Error) -> Self {
        use object_store::Error as E;
        match e {
            E::NotFound { source, .. } => {
                let body = chain(source.as_ref()).find_map(|l| status_text(&l.to_string()).map(|(_, b)| b));
                let (code, _) = body.as_deref().map(error_xml).unwrap_or_default();
                if code.as_deref() == Some("NoSuchBucket") {
                    return Problem::new(Class::Permanent, "answered 404 Not Found: NoSuchBucket", HINT_BUCKET);
                }
                Problem::new(Class::NotFound, "answered 404: no such object", HINT_OTHER)
            }
            _ => {
                for link in chain(e) {
                    if let Some(h) = link.downcast_ref::<HttpError>() {
                        return Problem::of_transport(h);
                    }
                    let text = link.to_string();
                    if let Some((status, body)) = status_text(&text) {
                        return Problem::of_status(status, &body);
                    }
                    if let Some(body) = text.strip_prefix("Server returned error response: ") {
                        // A 200 whose body is an S3 error (InternalError, SlowDown).
                        return Problem::new(
                            Class::Transient,
                            format!("answered with an error: {}", explanation(body)),
                            HINT_SERVER,
                        );
                    }
                    if text.starts_with("Received redirect without LOCATION") {
                        return Problem::new(Class::Permanent, "redirected the request elsewhere", HINT_REGION);
                    }
                }
                Problem::new(Class::Permanent, format!("failed: {}", clip(&one_line(&e.to_string()))), HINT_OTHER)
            }
        }
    }

    /// A failure before any answer: connecting, sending, or reading the answer.
    pub fn of_transport(h: &HttpError) -> Self {
        let root = chain(h).last().map(|l| l.to_string()).unwrap_or_default();
        let io = chain(h).find_map(|l| l.downcast_ref::<std::io::Error>().map(std::io::Error::kind));
        use std::io::ErrorKind as K;
        let what = match (h.kind(), io) {
            (_, Some(K::ConnectionRefused)) => "refused the connection (nothing listens there)".to_string(),
            (_, Some(K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof)) => {
                "closed the connection in the middle of the request".to_string()
            }
            (HttpErrorKind::Connect, Some(K::TimedOut)) | (HttpErrorKind::Timeout, _) => {
                "did not accept a connection in time".to_string()
            }
            (HttpErrorKind::Connect, _) if root.contains("lookup") || root.contains("resolve") => {
                format!("cannot be resolved ({})", clip(&one_line(&root)))
            }
            (HttpErrorKind::Connect, _) => format!("cannot be reached ({})", clip(&one_line(&root))),
            (HttpErrorKind::Interrupted, _) => "closed the connection in the middle of the request".to_string(),
            _ => format!("failed in the middle of the request ({})", clip(&one_line(&root))),
        };
        // A certificate the client refuses does not fix itself; anything else may.
        let class = if root.contains("certificate") { Class::Permanent } else { Class::Transient };
        let hint = if class == Class::Permanent { HINT_OTHER } else { HINT_UNREACHABLE };
        Problem::new(class, what, hint)
    }

    /// An HTTP answer other than success, with its body.
    pub fn of_status(status: u16, body: &str) -> Self {
        let reason = reason(status);
        let (code, message) = error_xml(body);
        let said = match (&code, &message) {
            (Some(c), Some(m)) => format!(": {c}: {}", clip(m)),
            (Some(c), None) => format!(": {c}"),
            (None, Some(m)) => format!(": {}", clip(m)),
            (None, None) if body.trim().is_empty() => " with no explanation".to_string(),
            (None, None) => format!(": {}", clip(&one_line(body))),
        };
        let what = format!("answered {status} {reason}{said}");
        let code = code.as_deref().unwrap_or("");
        let text = message.as_deref().unwrap_or("").to_ascii_lowercase();
        let transient = status >= 500 || status == 429 || status == 408 || code == "SlowDown";
        let hint = if text.contains("quorum") {
            HINT_QUORUM
        } else if status == 404 && code == "NoSuchBucket" {
            HINT_BUCKET
        } else if matches!(code, "SignatureDoesNotMatch" | "InvalidAccessKeyId" | "RequestTimeTooSkewed")
            || status == 401
        {
            HINT_SECRET
        } else if matches!(code, "AuthorizationHeaderMalformed" | "InvalidRegion" | "PermanentRedirect")
            || (300..400).contains(&status)
        {
            HINT_REGION
        } else if status == 403 {
            HINT_ACCESS
        } else if status == 503 || status == 429 || code == "SlowDown" {
            HINT_UNAVAILABLE
        } else if status >= 500 {
            HINT_SERVER
        } else {
            HINT_OTHER
        };
        let class = if status == 404 && code != "NoSuchBucket" {
            Class::NotFound
        } else if transient {
            Class::Transient
        } else {
            Class::Permanent
        };
        Problem::new(class, what, hint)
    }
}

/// An error and its sources, outermost first.
fn chain<'a>(e: &'a (dyn StdError + 'static)) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(Some(e), |&e| e.source())
}

/// `(status, body)` from object_store's text of a failed answer.
fn status_text(text: &str) -> Option<(u16, String)> {
    const PREFIX: &str = "Server returned non-2xx status code: ";
    let rest = &text[text.find(PREFIX)? + PREFIX.len()..];
    let status: u16 = rest.get(..3)?.parse().ok()?;
    // "503 Service Unavailable: BODY" (the reason phrase has no colon).
    let body = rest.split_once(": ").map(|(_, b)| b).unwrap_or("");
    Some((status, body.to_string()))
}

fn reason(status: u16) -> &'static str {
    match status {
        301 => "Moved Permanently",
        307 => "Temporary Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Payload Too Large",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

/// The `<Code>` and `<Message>` of an S3 error document, entities decoded.
fn error_xml(body: &str) -> (Option<String>, Option<String>) {
    #[derive(serde::Deserialize, Default)]
    #[serde(rename_all = "PascalCase", default)]
    struct ErrorDoc {
        code: Option<String>,
        message: Option<String>,
    }
    if !body.trim_start().starts_with('<') {
        return (None, None);
    }
    match quick_xml::de::from_str::<ErrorDoc>(body) {
        Ok(d) => (
            d.code.map(|c| one_line(&c)).filter(|c| !c.is_empty()),
            d.message.map(|m| one_line(&m)).filter(|m| !m.is_empty()),
        ),
        Err(_) => (None, None),
    }
}

/// A server's explanation: the message of an S3 error document, or the text itself.
fn explanation(body: &str) -> String {
    match error_xml(body) {
        (Some(c), Some(m)) => format!("{c}: {}", clip(&m)),
        (Some(c), None) => c,
        (None, Some(m)) => clip(&m),
        (None, None) => clip(&one_line(body)),
    }
}

/// At most [`DETAIL_MAX`] characters, marked when cut.
fn clip(s: &str) -> String {
    if s.chars().count() <= DETAIL_MAX {
        return s.to_string();
    }
    let mut out: String = s.chars().take(DETAIL_MAX).collect();
    out.push('…');
    out
}

/// Error texts of the HTTP stack span lines; a report line must not.
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUORUM: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>ServiceUnavailable</Code>\
        <Message>Internal error: Could not reach quorum of 2 (sets=None). 1 of 3 request succeeded, others \
        returned errors: [&quot;Network error: Not connected: 3758b8b8db41d6d0&quot;, &quot;Network error: \
        Not connected: 5c6aa53667323988&quot;]</Message><Resource>/bkt/a/obj2</Resource><Region>garage</Region></Error>";

    #[test]
    fn a_quorum_error_reads_as_words() {
        let p = Problem::of_status(503, QUORUM);
        assert_eq!(p.class, Class::Transient);
        assert!(
            p.what.starts_with(
                "answered 503 Service Unavailable: ServiceUnavailable: Internal error: Could not reach quorum of 2"
            ),
            "{}",
            p.what
        );
        assert!(p.what.contains("[\"Network error: Not connected"), "entities decoded: {}", p.what);
        assert!(!p.what.contains("&quot;") && !p.what.contains('<'), "{}", p.what);
        assert_eq!(p.hint, HINT_QUORUM);
        // A long explanation is cut.
        let long = QUORUM.replace("Internal error", &"very long ".repeat(100));
        let p = Problem::of_status(503, &long);
        assert!(p.what.ends_with('…') && p.what.chars().count() < DETAIL_MAX + 80, "{}", p.what);
    }

    #[test]
    fn statuses_are_classified() {
        let p = Problem::of_status(503, "");
        assert_eq!(
            (p.class, p.what.as_str()),
            (Class::Transient, "answered 503 Service Unavailable with no explanation")
        );
        assert_eq!(p.hint, HINT_UNAVAILABLE);
        assert_eq!(Problem::of_status(500, "oops").class, Class::Transient);
        assert_eq!(Problem::of_status(429, "").class, Class::Transient);
        let denied = Problem::of_status(403, "<Error><Code>AccessDenied</Code><Message>Forbidden</Message></Error>");
        assert_eq!((denied.class, denied.hint), (Class::Permanent, HINT_ACCESS));
        assert_eq!(denied.what, "answered 403 Forbidden: AccessDenied: Forbidden");
        let sig = Problem::of_status(403, "<Error><Code>SignatureDoesNotMatch</Code></Error>");
        assert_eq!(sig.hint, HINT_SECRET);
        let region = Problem::of_status(400, "<Error><Code>AuthorizationHeaderMalformed</Code></Error>");
        assert_eq!((region.class, region.hint), (Class::Permanent, HINT_REGION));
        assert_eq!(Problem::of_status(404, "<Error><Code>NoSuchBucket</Code></Error>").hint, HINT_BUCKET);
    }

    #[test]
    fn object_stores_status_text_is_parsed() {
        let text = "Server returned non-2xx status code: 503 Service Unavailable: <Error><Code>X</Code></Error>";
        assert_eq!(status_text(text), Some((503, "<Error><Code>X</Code></Error>".to_string())));
        assert_eq!(
            status_text("Server returned non-2xx status code: 500 Internal Server Error: "),
            Some((500, String::new()))
        );
        assert_eq!(status_text("something else"), None);
    }

    /// What a broken or hostile endpoint may answer — deeply nested or unclosed XML, a
    /// huge message, text cut inside a character — is described, never a panic.
    #[test]
    fn odd_answers_are_described_without_a_panic() {
        let deep = format!("<Error><Code>X</Code>{}{}</Error>", "<a>".repeat(50_000), "</a>".repeat(50_000));
        assert!(Problem::of_status(503, &deep).what.starts_with("answered 503 Service Unavailable"));
        let unclosed = format!("<Error><Message>{}", "<b>".repeat(50_000));
        assert_eq!(Problem::of_status(500, &unclosed).class, Class::Transient);
        let huge = format!("<Error><Code>SlowDown</Code><Message>{}</Message></Error>", "é".repeat(1 << 20));
        let p = Problem::of_status(503, &huge);
        assert!(p.what.chars().count() < DETAIL_MAX + 80, "{}", p.what.len());
        assert_eq!(status_text("Server returned non-2xx status code: 5é"), None);
        assert_eq!(status_text("Server returned non-2xx status code: "), None);
        assert!(Problem::of_status(999, "\u{0}\u{fffd}").what.starts_with("answered 999 "));
    }
}
