//! Notifications at the end of a run: a command (the JSON run report on its standard
//! input) or a webhook (an HTTP POST of the JSON run report), on success, failure or
//! taint, each with a timeout. No e-mail of its own: a command can send one.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::hook::Hook;
use crate::report::RunStatus;

/// When a notification fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NotifyOn {
    /// Every vm backed up, nothing tainted, retention and copy done.
    Success,
    /// Something failed (a vm, retention, the copy, a report).
    Failure,
    /// A restore point is tainted: verification found source and backup differ.
    Tainted,
}

/// Where a notification goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotifyTarget {
    /// A program and its arguments.
    Command(Vec<String>),
    /// An http:// or https:// URL.
    Webhook(String),
}

/// A `[[notify]]` of the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notify {
    pub on: Vec<NotifyOn>,
    pub target: NotifyTarget,
    pub timeout: Duration,
}

/// What sending a notification did.
#[derive(Clone, Debug, Serialize)]
pub struct NotifyRun {
    /// The command's program, or the webhook's scheme and host (a URL's path may hold a
    /// secret token: it is not repeated).
    pub target: String,
    pub on: NotifyOn,
    pub error: Option<String>,
}

impl Notify {
    /// The event of a run this notification fires on, if any.
    pub fn fires_on(&self, status: RunStatus) -> Option<NotifyOn> {
        let event = match status {
            RunStatus::Ok => NotifyOn::Success,
            RunStatus::Tainted => NotifyOn::Tainted,
            RunStatus::Failed => NotifyOn::Failure,
        };
        self.on.contains(&event).then_some(event)
    }

    /// Sends the report `json` of a run with `status` of job `job`.
    pub fn send(&self, job: &str, status: RunStatus, json: &[u8], report_path: Option<&str>) -> Option<NotifyRun> {
        let on = self.fires_on(status)?;
        let (target, error) = match &self.target {
            NotifyTarget::Command(argv) => {
                let hook = Hook { command: argv.clone(), timeout: self.timeout };
                let mut env =
                    vec![("BLOCKPROOF_JOB", job.to_string()), ("BLOCKPROOF_RUN_STATUS", status.as_str().to_string())];
                if let Some(p) = report_path {
                    env.push(("BLOCKPROOF_REPORT", p.to_string()));
                }
                (argv[0].clone(), hook.run(&env, Some(json)).error)
            }
            NotifyTarget::Webhook(url) => (origin(url), post(url, json, self.timeout).err()),
        };
        Some(NotifyRun { target, on, error })
    }
}

/// `https://host:port` of a URL.
pub(crate) fn origin(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = host.rsplit('@').next().unwrap_or(host);
    format!("{scheme}://{host}")
}

/// POSTs `body` as JSON to `url`; an error unless the answer is a 2xx within `timeout`.
fn post(url: &str, body: &[u8], timeout: Duration) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("webhook: cannot start the HTTP client: {e}"))?;
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .map_err(|e| format!("webhook: cannot start the HTTP client: {e}"))?;
    let body = body.to_vec();
    runtime.block_on(async move {
        let answer = client
            .post(url)
            .header("content-type", "application/json")
            .header("user-agent", concat!("blockproof/", env!("CARGO_PKG_VERSION")))
            .body(body)
            .send()
            .await
            .map_err(|e| format!("webhook {}: {}", origin(url), without_url(&e)))?;
        if answer.status().is_success() {
            Ok(())
        } else {
            Err(format!("webhook {}: answered {}", origin(url), answer.status()))
        }
    })
}

/// An HTTP client error in words, without the URL (which may hold a token).
fn without_url(e: &reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "cannot connect".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = std::error::Error::source(e);
    let mut detail = String::new();
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if detail.is_empty() {
        what
    } else {
        format!("{what}: {detail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn origins_hide_paths_and_credentials() {
        assert_eq!(origin("https://hooks.example.com/services/T000/SECRET"), "https://hooks.example.com");
        assert_eq!(origin("http://user:pw@127.0.0.1:8080/x?token=1"), "http://127.0.0.1:8080");
    }

    #[test]
    fn fires_only_on_its_events() {
        let n = Notify {
            on: vec![NotifyOn::Failure],
            target: NotifyTarget::Command(vec!["true".into()]),
            timeout: Duration::from_secs(5),
        };
        assert_eq!(n.fires_on(RunStatus::Failed), Some(NotifyOn::Failure));
        assert_eq!(n.fires_on(RunStatus::Ok), None);
        assert!(n.send("j", RunStatus::Ok, b"{}", None).is_none());
        assert!(n.send("j", RunStatus::Failed, b"{}", None).unwrap().error.is_none());
    }

    /// A webhook POSTs the report; a server that answers an error, or never answers, is
    /// an error within the timeout.
    #[test]
    fn webhooks_post_the_report_and_time_out() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let mut bodies = Vec::new();
            for answer in ["200 OK", "500 Internal Server Error"] {
                let (mut s, _) = listener.accept().unwrap();
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let n = s.read(&mut buf).unwrap();
                    req.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&req).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len: usize = text
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap())
                            })
                            .unwrap_or(0);
                        if req.len() >= end + 4 + len {
                            bodies.push(text[end + 4..].to_string());
                            break;
                        }
                    }
                    if n == 0 {
                        break;
                    }
                }
                write!(s, "HTTP/1.1 {answer}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").unwrap();
            }
            // A third connection that is never answered.
            let (s, _) = listener.accept().unwrap();
            std::thread::sleep(Duration::from_secs(2));
            drop(s);
            bodies
        });
        let url = format!("http://{addr}/hook/SECRET");
        let n = Notify {
            on: vec![NotifyOn::Success, NotifyOn::Failure],
            target: NotifyTarget::Webhook(url),
            timeout: Duration::from_millis(500),
        };
        let first = n.send("j", RunStatus::Ok, br#"{"status":"ok"}"#, None).unwrap();
        assert_eq!(first.error, None);
        assert_eq!(first.target, format!("http://{addr}"));
        let second = n.send("j", RunStatus::Failed, b"{}", None).unwrap();
        assert!(second.error.as_deref().unwrap().contains("500"), "{second:?}");
        let third = n.send("j", RunStatus::Failed, b"{}", None).unwrap();
        assert!(third.error.as_deref().unwrap().contains("timed out"), "{third:?}");
        assert!(!third.error.unwrap().contains("SECRET"));
        assert_eq!(server.join().unwrap(), [r#"{"status":"ok"}"#, "{}"]);
    }
}
