//! Repository locations: a directory, `s3://BUCKET/PREFIX` or a repository server's
//! `https://HOST:PORT/NAME`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use blockproof_s3::{RequestCounts, S3Backend, S3Location, S3Options};
use blockproof_server::client::{ClientError, ClientOptions, RemoteBackend};
use blockproof_store::{Backend, LocalBackend, ReadCache};

use crate::args::StoreArgs;

/// Request counters of the S3 repositories this process opened, printed on exit when
/// `BLOCKPROOF_S3_STATS` is set (the figures of docs/OBJECT-STORAGE.md's cost model).
static S3_COUNTS: Mutex<Vec<Arc<RequestCounts>>> = Mutex::new(Vec::new());

/// Opens (or, with `create`, prepares) the repository at `location`.
pub fn backend(location: &str, store: &StoreArgs, create: bool) -> Result<Box<dyn Backend>> {
    if blockproof_server::client::is_server_url(location) {
        let options = client_options(store)?;
        let remote = if create {
            RemoteBackend::connect(location, &options).map(|(r, _)| r)
        } else {
            RemoteBackend::open(location, &options)
        }
        .map_err(server_error)?;
        if store.no_cache {
            return Ok(Box::new(remote));
        }
        let dir = cache_dir(store.cache_dir.clone(), location, "server");
        let cached =
            ReadCache::new(Box::new(remote), &dir).with_context(|| format!("cache directory {}", dir.display()))?;
        return Ok(Box::new(cached));
    }
    if !S3Location::is_s3_url(location) {
        let backend = if create { LocalBackend::create(location) } else { LocalBackend::open(location) };
        return Ok(Box::new(backend?));
    }
    let parsed = S3Location::parse(location).map_err(|e| crate::Usage(e.to_string()))?;
    let options = S3Options {
        endpoints: S3Options::parse_endpoints(&store.s3_endpoint).map_err(|e| crate::Usage(e.to_string()))?,
        path_style: store.s3_path_style,
        retry_timeout: Duration::from_secs(store.s3_retry_timeout),
        uploads: usize::from(store.s3_uploads),
    };
    let s3 = if create { S3Backend::create(parsed, &options) } else { S3Backend::open(parsed, &options) }?;
    S3_COUNTS.lock().expect("counts lock").push(s3.counts());
    if store.no_cache {
        return Ok(Box::new(s3));
    }
    let dir = cache_dir(store.cache_dir.clone(), location, &options.endpoints.join(","));
    let cached = ReadCache::new(Box::new(s3), &dir).with_context(|| format!("cache directory {}", dir.display()))?;
    Ok(Box::new(cached))
}

/// Where the blob index keeps its local cache for the repository at `location`: the
/// repository's cache directory (the read cache's, for S3 and servers); none with
/// `--no-cache`.
pub fn index_cache(store: &StoreArgs, location: &str) -> Option<PathBuf> {
    if store.no_cache {
        return None;
    }
    let (key, endpoints) = if blockproof_server::client::is_server_url(location) {
        (location.to_string(), "server".to_string())
    } else if S3Location::is_s3_url(location) {
        (location.to_string(), S3Options::parse_endpoints(&store.s3_endpoint).unwrap_or_default().join(","))
    } else {
        let canonical = std::fs::canonicalize(location).map(|p| p.display().to_string());
        (canonical.unwrap_or_else(|_| location.to_string()), "directory".to_string())
    };
    Some(cache_dir(store.cache_dir.clone(), &key, &endpoints))
}

/// `--cache-dir`, else `$XDG_CACHE_HOME/blockproof` or `~/.cache/blockproof`, then one
/// directory per repository location.
fn cache_dir(explicit: Option<PathBuf>, location: &str, endpoints: &str) -> PathBuf {
    let base = explicit.unwrap_or_else(|| {
        std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(std::env::temp_dir)
            .join("blockproof")
    });
    let key = format!("{endpoints}|{location}");
    base.join(&blake3::hash(key.as_bytes()).to_hex()[..16])
}

/// Prints the S3 request counters to stderr as one JSON line, if asked for.
pub fn report_requests() {
    if std::env::var_os("BLOCKPROOF_S3_STATS").is_none() {
        return;
    }
    for counts in S3_COUNTS.lock().expect("counts lock").iter() {
        let map: serde_json::Map<String, serde_json::Value> =
            counts.snapshot().into_iter().map(|(k, v)| (k.to_string(), v.into())).collect();
        eprintln!("blockproof: s3 requests: {}", serde_json::Value::Object(map));
    }
}

/// How to reach a repository server: the token (`--token-file`, else BLOCKPROOF_TOKEN)
/// and how to trust its certificate.
pub fn client_options(store: &StoreArgs) -> Result<ClientOptions> {
    let token = match &store.token_file {
        Some(file) => std::fs::read_to_string(file)
            .with_context(|| format!("token file {}", file.display()))?
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string(),
        None => std::env::var("BLOCKPROOF_TOKEN").unwrap_or_default(),
    };
    let fingerprint = match &store.server_fingerprint {
        Some(text) => Some(blockproof_server::tls::parse_fingerprint(text).ok_or_else(|| {
            crate::Usage(format!("--server-fingerprint {text:?}: expected sha256: and 64 hex digits"))
        })?),
        None => None,
    };
    Ok(ClientOptions { token, fingerprint, ca: store.server_ca.clone(), vm: store.vm.clone() })
}

/// A client error as the CLI reports it: a bad URL or missing token is a usage error.
pub fn server_error(e: ClientError) -> anyhow::Error {
    match e {
        ClientError::Url(m) => crate::Usage(m).into(),
        other => other.into(),
    }
}
