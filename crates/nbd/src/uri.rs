//! NBD URIs (the NBD project's URI specification, doc/uri.md), the two forms blockproof
//! accepts:
//!
//! - `nbd://HOST[:PORT]/EXPORT` — TCP, port 10809 by default; `HOST` may be a name, an IPv4
//!   address or a bracketed IPv6 address (`[::1]`).
//! - `nbd+unix:///EXPORT?socket=PATH` — a unix domain socket.
//!
//! `EXPORT` is the path without its leading `/`, percent-decoded; empty means the server's
//! default export. TLS (`nbds…`), vsock and unknown query parameters are refused with an
//! error that says so, never ignored.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// The IANA-assigned NBD port.
pub const DEFAULT_PORT: u16 = 10809;

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A TCP address; `host` is a name or an address (IPv6 without brackets).
    Tcp { host: String, port: u16 },
    /// A unix domain socket.
    Unix(PathBuf),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Endpoint::Tcp { host, port } => write!(f, "{host}:{port}"),
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A parsed NBD URI: an endpoint and an export name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uri {
    pub endpoint: Endpoint,
    pub export: String,
}

/// Why a string is not an NBD URI this client can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid NBD URI {uri:?}: {reason}")]
pub struct UriError {
    pub uri: String,
    pub reason: String,
}

impl Uri {
    /// A unix-socket URI, as used for a private qemu-nbd.
    pub fn unix(socket: impl Into<PathBuf>, export: impl Into<String>) -> Uri {
        Uri { endpoint: Endpoint::Unix(socket.into()), export: export.into() }
    }

    /// A TCP URI.
    pub fn tcp(host: impl Into<String>, port: u16, export: impl Into<String>) -> Uri {
        Uri { endpoint: Endpoint::Tcp { host: host.into(), port }, export: export.into() }
    }

    /// Parses `nbd://HOST[:PORT]/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`.
    pub fn parse(s: &str) -> Result<Uri, UriError> {
        let err = |reason: &str| UriError { uri: s.to_string(), reason: reason.to_string() };
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| err("expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH"))?;
        let scheme = scheme.to_ascii_lowercase();
        match scheme.as_str() {
            "nbd" | "nbd+tcp" | "nbd+unix" => {}
            "nbds" | "nbds+tcp" | "nbds+unix" | "nbds+vsock" => {
                return Err(err("TLS (nbds) is not supported by this client"))
            }
            "nbd+vsock" => return Err(err("vsock transport is not supported")),
            _ => return Err(err("the scheme must be nbd:// or nbd+unix://")),
        }
        if rest.contains('#') {
            return Err(err("a fragment (#...) is not allowed"));
        }
        let (before_query, query) = match rest.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.find('/') {
            Some(i) => (&before_query[..i], &before_query[i + 1..]),
            None => (before_query, ""),
        };
        let export = percent_decode(path).map_err(|r| err(&format!("export name: {r}")))?;
        let params = parse_query(query).map_err(|r| err(&r))?;

        if scheme == "nbd+unix" {
            if !authority.is_empty() {
                return Err(err("nbd+unix:// takes no host: write nbd+unix:///EXPORT?socket=PATH"));
            }
            let mut socket = None;
            for (key, value) in params {
                match key.as_str() {
                    "socket" if socket.is_none() => socket = Some(value),
                    "socket" => return Err(err("socket= is given twice")),
                    other => return Err(err(&format!("unsupported query parameter {other:?}"))),
                }
            }
            let socket = socket.ok_or_else(|| err("nbd+unix:// needs ?socket=PATH"))?;
            if socket.is_empty() {
                return Err(err("socket= is empty"));
            }
            return Ok(Uri::unix(socket, export));
        }

        if let Some((key, _)) = params.first() {
            let reason = if key == "socket" {
                "socket= is only valid with nbd+unix://".to_string()
            } else {
                format!("unsupported query parameter {key:?}")
            };
            return Err(err(&reason));
        }
        if authority.contains('@') {
            return Err(err("user information (user@host) is not supported"));
        }
        let (host, port) = split_host_port(authority).map_err(|r| err(&r))?;
        Ok(Uri::tcp(host, port.unwrap_or(DEFAULT_PORT), export))
    }
}

impl FromStr for Uri {
    type Err = UriError;
    fn from_str(s: &str) -> Result<Uri, UriError> {
        Uri::parse(s)
    }
}

impl fmt::Display for Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.endpoint {
            Endpoint::Tcp { .. } => write!(f, "nbd://{}/{}", self.endpoint, percent_encode(&self.export)),
            Endpoint::Unix(path) => write!(
                f,
                "nbd+unix:///{}?socket={}",
                percent_encode(&self.export),
                percent_encode(&path.to_string_lossy())
            ),
        }
    }
}

fn split_host_port(authority: &str) -> Result<(String, Option<u16>), String> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("unterminated [IPv6] host")?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("junk after ]")?),
        };
        (host.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, _)) if h.contains(':') => return Err("an IPv6 host must be written in brackets".into()),
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err("nbd:// needs a host".into());
    }
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => return Err(format!("invalid port {p:?}")),
            Ok(p) => Some(p),
        },
    };
    Ok((percent_decode(&host)?, port))
}

fn parse_query(query: Option<&str>) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.push((percent_decode(k)?, percent_decode(v)?));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or("truncated %-escape")?;
            let hex = std::str::from_utf8(hex).map_err(|_| "bad %-escape")?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| format!("bad %-escape %{hex}"))?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "not valid UTF-8 after %-decoding".to_string())
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_forms() {
        assert_eq!(Uri::parse("nbd://example.com/disk0").unwrap(), Uri::tcp("example.com", 10809, "disk0"));
        assert_eq!(Uri::parse("nbd://127.0.0.1:10810/").unwrap(), Uri::tcp("127.0.0.1", 10810, ""));
        assert_eq!(Uri::parse("nbd://host").unwrap(), Uri::tcp("host", 10809, ""));
        assert_eq!(Uri::parse("nbd://[::1]:99/a%20b").unwrap(), Uri::tcp("::1", 99, "a b"));
        assert_eq!(Uri::parse("nbd://[::1]/x").unwrap(), Uri::tcp("::1", 10809, "x"));
        assert_eq!(Uri::parse("NBD://h/with/slash").unwrap(), Uri::tcp("h", 10809, "with/slash"));
    }

    #[test]
    fn unix_forms() {
        assert_eq!(Uri::parse("nbd+unix:///disk?socket=/run/q.sock").unwrap(), Uri::unix("/run/q.sock", "disk"));
        assert_eq!(Uri::parse("nbd+unix://?socket=/a%20b.sock").unwrap(), Uri::unix("/a b.sock", ""));
        assert_eq!(Uri::parse("nbd+unix:///?socket=rel.sock").unwrap(), Uri::unix("rel.sock", ""));
    }

    #[test]
    fn round_trips_through_display() {
        for s in ["nbd://h:1/e", "nbd://[::1]:10809/a%20b", "nbd+unix:///x?socket=/tmp/s%20p.sock"] {
            let u = Uri::parse(s).unwrap();
            assert_eq!(Uri::parse(&u.to_string()).unwrap(), u, "{s} -> {u}");
        }
    }

    #[test]
    fn errors_say_why() {
        let cases = [
            ("/tmp/disk.raw", "expected nbd://"),
            ("http://h/e", "scheme must be"),
            ("nbds://h/e", "TLS"),
            ("nbd+vsock://1/e", "vsock"),
            ("nbd+unix:///e", "needs ?socket="),
            ("nbd+unix://host/e?socket=/s", "takes no host"),
            ("nbd+unix:///e?socket=/s&tls=1", "unsupported query parameter"),
            ("nbd+unix:///e?socket=", "socket= is empty"),
            ("nbd://h/e?socket=/s", "only valid with nbd+unix"),
            ("nbd://h:0/e", "invalid port"),
            ("nbd://h:99999/e", "invalid port"),
            ("nbd://h:x/e", "invalid port"),
            ("nbd:///e", "needs a host"),
            ("nbd://::1/e", "brackets"),
            ("nbd://[::1/e", "unterminated"),
            ("nbd://h/e%zz", "bad %-escape"),
            ("nbd://h/e%4", "truncated"),
            ("nbd://h/%ff", "UTF-8"),
            ("nbd://u@h/e", "user information"),
            ("nbd://h/e#frag", "fragment"),
        ];
        for (s, want) in cases {
            let e = Uri::parse(s).unwrap_err().to_string();
            assert!(e.contains(want), "{s}: {e} (wanted {want:?})");
        }
    }
}
