//! [`RemoteBackend`]: the storage trait over a repository server,
//! `https://HOST:PORT/NAME`.
//!
//! Every request carries the token (`Authorization: Bearer`). The server's certificate
//! is checked against a pinned SHA-256 fingerprint (a self-signed server), or a CA
//! file, or else the system's roots. A request the server refuses fails at once with
//! its one-line reason; a server that cannot be reached, is shutting down (`503`) or
//! has too many requests of the token in progress (`429`) is retried for
//! [`RETRY_FOR`], and then fails with one line. Every request is safe to repeat: a
//! content-addressed write writes the same bytes, a removal of a missing file succeeds.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use blockproof_store::{Backend, Kind, StoreError};
use reqwest::blocking::{Client, RequestBuilder, Response};
use reqwest::{Method, StatusCode};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;

use crate::route::{object_path, valid_repo_name, MODIFIED};

/// How long unreachable servers and busy answers are retried.
pub const RETRY_FOR: Duration = Duration::from_secs(15);

/// How the client finds and trusts the server.
#[derive(Clone, Debug, Default)]
pub struct ClientOptions {
    pub token: String,
    /// The SHA-256 fingerprint of the server's certificate ([`crate::tls::parse_fingerprint`]).
    pub fingerprint: Option<[u8; 32]>,
    /// A PEM file of the CA (or certificate) to trust.
    pub ca: Option<PathBuf>,
    /// The vm the operation is for, declared on every request (a token limited to some
    /// vms needs it to write snapshots).
    pub vm: Option<String>,
}

/// Errors of connecting to a server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Url(String),
    #[error("{0}")]
    Tls(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the server says about the token.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct WhoAmI {
    pub repository: String,
    pub token: String,
    pub role: String,
}

/// A repository on a server.
pub struct RemoteBackend {
    url: String,
    base: String,
    repo: String,
    token: String,
    vm: Option<String>,
    client: Client,
}

/// Whether a repository location is a server URL.
pub fn is_server_url(location: &str) -> bool {
    location.starts_with("https://")
}

/// `https://HOST[:PORT]/NAME` as (`https://HOST:PORT`, NAME).
pub fn parse_url(url: &str) -> Result<(String, String), ClientError> {
    let bad = || ClientError::Url(format!("{url}: a server repository is https://HOST[:PORT]/NAME"));
    let rest = url.strip_prefix("https://").ok_or_else(bad)?;
    let (host, name) = rest.trim_end_matches('/').split_once('/').ok_or_else(bad)?;
    if host.is_empty() || !valid_repo_name(name) {
        return Err(bad());
    }
    Ok((format!("https://{host}"), name.to_string()))
}

#[derive(Debug)]
struct Pinned {
    print: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, end_entity.as_ref());
        if digest.as_ref() == self.print {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the server's certificate is {}, not the pinned fingerprint",
                crate::tls::fingerprint(end_entity.as_ref())
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_config(options: &ClientOptions) -> Result<rustls::ClientConfig, ClientError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Tls(e.to_string()))?;
    let mut config = if let Some(print) = options.fingerprint {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(Pinned { print, provider })).with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        if let Some(ca) = &options.ca {
            let bad = |e: String| ClientError::Tls(format!("{}: {e}", ca.display()));
            for cert in CertificateDer::pem_file_iter(ca).map_err(|e| bad(e.to_string()))? {
                roots.add(cert.map_err(|e| bad(e.to_string()))?).map_err(|e| bad(e.to_string()))?;
            }
        } else {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// An error and its causes on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

impl RemoteBackend {
    /// Connects to the repository `url` and asks the server who the token is (which
    /// checks the certificate and the token before anything else happens).
    pub fn connect(url: &str, options: &ClientOptions) -> Result<(RemoteBackend, WhoAmI), ClientError> {
        let (base, repo) = parse_url(url)?;
        if options.token.is_empty() {
            return Err(ClientError::Url(format!("{url}: no token (set BLOCKPROOF_TOKEN or --token-file)")));
        }
        let client = Client::builder()
            .tls_backend_preconfigured(tls_config(options)?)
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(600))
            .pool_max_idle_per_host(8)
            .user_agent(concat!("blockproof/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Tls(chain(&e)))?;
        let me = RemoteBackend {
            url: url.trim_end_matches('/').to_string(),
            base,
            repo,
            token: options.token.clone(),
            vm: options.vm.clone(),
            client,
        };
        let info = me.call(Method::GET, &format!("/v1/{}/", me.repo), None, |r| r)?;
        let who: WhoAmI = serde_json::from_slice(&info)
            .map_err(|e| StoreError::Remote(format!("{}: not a blockproof server answer: {e}", me.url)))?;
        Ok((me, who))
    }

    /// Opens an existing repository: its config must exist.
    pub fn open(url: &str, options: &ClientOptions) -> Result<RemoteBackend, ClientError> {
        let (me, _) = Self::connect(url, options)?;
        match me.size(Kind::Config, "config") {
            Ok(_) => Ok(me),
            Err(e) if e.is_not_found() => Err(StoreError::Invalid(format!(
                "{url} is not a blockproof repository (no config file); create one with blockproof init --repo {url}"
            ))
            .into()),
            Err(e) => Err(e.into()),
        }
    }

    /// The trash of the repository (an admin token): the server's JSON list.
    pub fn trash(&self) -> Result<Vec<crate::trash::TrashEntry>, StoreError> {
        let bytes = self.call(Method::GET, &format!("/v1/{}/trash", self.repo), None, |r| r)?;
        serde_json::from_slice(&bytes).map_err(|e| StoreError::Remote(format!("{}: bad trash list: {e}", self.url)))
    }

    /// Puts a trashed file back (an admin token).
    pub fn untrash(&self, id: &str) -> Result<crate::trash::TrashEntry, StoreError> {
        let bytes = self.call(Method::POST, &format!("/v1/{}/trash/{id}", self.repo), None, |r| r)?;
        serde_json::from_slice(&bytes).map_err(|e| StoreError::Remote(format!("{}: bad answer: {e}", self.url)))
    }

    /// One request, retried while the server is unreachable or busy; the body of a
    /// success, or the error the status means.
    fn call(
        &self,
        method: Method,
        path: &str,
        not_found: Option<(Kind, &str)>,
        extra: impl Fn(RequestBuilder) -> RequestBuilder,
    ) -> Result<bytes::Bytes, StoreError> {
        self.call_response(method, path, not_found, extra, |r| r.bytes())
    }

    fn call_response<T>(
        &self,
        method: Method,
        path: &str,
        not_found: Option<(Kind, &str)>,
        extra: impl Fn(RequestBuilder) -> RequestBuilder,
        take: impl Fn(Response) -> reqwest::Result<T>,
    ) -> Result<T, StoreError> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(100);
        loop {
            let mut request =
                self.client.request(method.clone(), format!("{}{path}", self.base)).bearer_auth(&self.token);
            if let Some(vm) = &self.vm {
                request = request.header(crate::route::VM, vm);
            }
            let request = extra(request);
            let retry_text = match request.send() {
                Ok(resp) => {
                    let status = resp.status();
                    if status.is_success() {
                        return take(resp).map_err(|e| StoreError::Remote(format!("{}: {}", self.url, chain(&e))));
                    }
                    let text = resp.text().unwrap_or_default().trim().to_string();
                    match status {
                        StatusCode::NOT_FOUND => {
                            if let Some((kind, name)) = not_found {
                                return Err(StoreError::NotFound { kind, name: name.to_string() });
                            }
                            return Err(StoreError::Remote(format!("{}: {text}", self.url)));
                        }
                        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => text,
                        StatusCode::UNAUTHORIZED => {
                            return Err(StoreError::Remote(format!(
                                "{}: the server refused the token: {text}",
                                self.url
                            )))
                        }
                        StatusCode::FORBIDDEN => {
                            return Err(StoreError::Remote(format!("{}: permission denied: {text}", self.url)))
                        }
                        _ => return Err(StoreError::Remote(format!("{}: {text} ({})", self.url, status.as_u16()))),
                    }
                }
                Err(e) if e.is_connect() || e.is_timeout() || e.is_request() => {
                    let text = chain(&e);
                    // A certificate that does not match never will.
                    if text.contains("certificate") || text.contains("fingerprint") {
                        return Err(StoreError::Remote(format!("{}: {text}", self.url)));
                    }
                    text
                }
                Err(e) => return Err(StoreError::Remote(format!("{}: {}", self.url, chain(&e)))),
            };
            if start.elapsed() + pause > RETRY_FOR {
                return Err(StoreError::Remote(format!(
                    "{}: the server did not answer for {} s: {retry_text}",
                    self.url,
                    RETRY_FOR.as_secs()
                )));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    fn object(&self, kind: Kind, name: &str) -> String {
        object_path(&self.repo, kind, if kind == Kind::Config { "config" } else { name })
    }

    fn stat(&self, kind: Kind, name: &str) -> Result<(u64, SystemTime), StoreError> {
        let path = self.object(kind, name);
        self.call_response(
            Method::HEAD,
            &path,
            Some((kind, name)),
            |r| r,
            |resp| {
                let header =
                    |h: &str| resp.headers().get(h).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u128>().ok());
                let size = header("blockproof-size").unwrap_or(0) as u64;
                let nanos = header(MODIFIED).unwrap_or(0);
                let time = SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos.min(u64::MAX as u128) as u64);
                Ok((size, time))
            },
        )
    }
}

impl Backend for RemoteBackend {
    fn location(&self) -> String {
        self.url.clone()
    }

    fn read(&self, kind: Kind, name: &str) -> Result<Vec<u8>, StoreError> {
        Ok(self.call(Method::GET, &self.object(kind, name), Some((kind, name)), |r| r)?.into())
    }

    fn read_at(&self, kind: Kind, name: &str, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        if buf.is_empty() {
            return Ok(());
        }
        let last = offset + buf.len() as u64 - 1;
        let bytes = self.call(Method::GET, &self.object(kind, name), Some((kind, name)), |r| {
            r.header("range", format!("bytes={offset}-{last}"))
        })?;
        if bytes.len() != buf.len() {
            return Err(StoreError::Remote(format!("{}: short read of {kind} {name}", self.url)));
        }
        buf.copy_from_slice(&bytes);
        Ok(())
    }

    fn size(&self, kind: Kind, name: &str) -> Result<u64, StoreError> {
        Ok(self.stat(kind, name)?.0)
    }

    fn modified(&self, kind: Kind, name: &str) -> Result<SystemTime, StoreError> {
        Ok(self.stat(kind, name)?.1)
    }

    fn write(&self, kind: Kind, name: &str, data: &[u8]) -> Result<(), StoreError> {
        let body = bytes::Bytes::copy_from_slice(data);
        self.call(Method::PUT, &self.object(kind, name), None, |r| r.body(body.clone())).map(|_| ())
    }

    fn write_owned(&self, kind: Kind, name: &str, data: Vec<u8>) -> Result<Option<Vec<u8>>, StoreError> {
        // The body is shared by the attempts of a retried request, never copied.
        let body = bytes::Bytes::from(data);
        self.call(Method::PUT, &self.object(kind, name), None, |r| r.body(body.clone()))?;
        Ok(None)
    }

    fn list(&self, kind: Kind) -> Result<Vec<String>, StoreError> {
        Ok(self.list_sizes(kind)?.into_iter().map(|(n, _)| n).collect())
    }

    fn list_sizes(&self, kind: Kind) -> Result<Vec<(String, u64)>, StoreError> {
        let bytes = self.call(Method::GET, &format!("/v1/{}/o/{}/", self.repo, kind.name()), None, |r| r)?;
        let text =
            String::from_utf8(bytes.into()).map_err(|_| StoreError::Remote(format!("{}: bad listing", self.url)))?;
        text.lines()
            .map(|l| {
                let (n, s) =
                    l.split_once(' ').ok_or_else(|| StoreError::Remote(format!("{}: bad listing", self.url)))?;
                Ok((n.to_string(), s.parse().map_err(|_| StoreError::Remote(format!("{}: bad listing", self.url)))?))
            })
            .collect()
    }

    fn remove(&self, kind: Kind, name: &str) -> Result<(), StoreError> {
        match self.call(Method::DELETE, &self.object(kind, name), Some((kind, name)), |r| r) {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn parallelism(&self) -> usize {
        4
    }

    fn receipt_times(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls() {
        assert_eq!(parse_url("https://h:8443/main").unwrap(), ("https://h:8443".into(), "main".into()));
        assert_eq!(parse_url("https://h/main/").unwrap(), ("https://h".into(), "main".into()));
        for bad in ["https://h", "https:///main", "https://h/a/b", "http://h/main", "https://h/../x"] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}
