//! [`S3Backend`]: the storage trait over an S3 bucket.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blockproof_store::{relative_path, Backend, Kind, StoreError};
use futures_util::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig, WriteMultipart,
};

use crate::{S3Error, S3Location, S3Options};

/// Objects up to this size are written with one PUT; larger ones by multipart upload.
pub const MULTIPART_THRESHOLD: usize = 64 << 20;
/// The part size of multipart uploads.
pub const PART_SIZE: usize = 16 << 20;
/// Parts of one multipart upload in flight at once.
const PARTS_IN_FLIGHT: usize = 4;

/// Requests sent so far, by kind (retries not counted): the figures of the cost model.
#[derive(Debug, Default)]
pub struct RequestCounts {
    pub put: AtomicU64,
    pub multipart_part: AtomicU64,
    pub get: AtomicU64,
    pub head: AtomicU64,
    pub list: AtomicU64,
    pub delete: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
}

impl RequestCounts {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// A snapshot of the counters as `(name, value)` pairs.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("put", l(&self.put)),
            ("multipart_part", l(&self.multipart_part)),
            ("get", l(&self.get)),
            ("head", l(&self.head)),
            ("list", l(&self.list)),
            ("delete", l(&self.delete)),
            ("bytes_up", l(&self.bytes_up)),
            ("bytes_down", l(&self.bytes_down)),
        ]
    }
}

/// A repository under `s3://BUCKET/PREFIX`. The synchronous [`Backend`] calls run on a
/// small private tokio runtime; any number of threads may call at once.
pub struct S3Backend {
    location: S3Location,
    store: AmazonS3,
    runtime: tokio::runtime::Runtime,
    uploads: usize,
    counts: Arc<RequestCounts>,
}

impl S3Backend {
    /// Connects to an existing repository: its `config` object must exist.
    pub fn open(location: S3Location, options: &S3Options) -> Result<Self, S3Error> {
        let b = Self::connect(location, options)?;
        match b.size(Kind::Config, "config") {
            Ok(_) => Ok(b),
            Err(e) if e.is_not_found() => Err(S3Error::NotARepository(b.location.to_string())),
            Err(e) => Err(e.into()),
        }
    }

    /// Connects for a new repository: nothing may exist under the prefix yet.
    pub fn create(location: S3Location, options: &S3Options) -> Result<Self, S3Error> {
        let b = Self::connect(location, options)?;
        let prefix = (!b.location.prefix.is_empty()).then(|| Path::from(b.location.prefix.as_str()));
        RequestCounts::add(&b.counts.list, 1);
        let first = b
            .runtime
            .block_on(async { b.store.list(prefix.as_ref()).try_next().await })
            .map_err(|e| b.remote("LIST", &b.location.prefix, e))?;
        if first.is_some() {
            return Err(S3Error::NotEmpty(b.location.to_string()));
        }
        Ok(b)
    }

    fn connect(location: S3Location, options: &S3Options) -> Result<Self, S3Error> {
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(&location.bucket);
        // The endpoint in effect: the option, else what `from_env` took from the
        // environment. It decides plain HTTP and path-style addressing.
        let endpoint = options
            .endpoint
            .clone()
            .or_else(|| ["AWS_ENDPOINT_URL", "AWS_ENDPOINT"].iter().find_map(|v| std::env::var(v).ok()));
        if let Some(e) = &options.endpoint {
            builder = builder.with_endpoint(e);
        }
        if std::env::var_os("AWS_REGION").is_none() && std::env::var_os("AWS_DEFAULT_REGION").is_none() {
            builder = builder.with_region("us-east-1");
        }
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(10),
                base: 2.0,
            },
            max_retries: 20,
            retry_timeout: options.retry_timeout,
        };
        let client = ClientOptions::new()
            .with_timeout(Duration::from_secs(300))
            .with_connect_timeout(Duration::from_secs(5))
            .with_allow_http(endpoint.as_deref().is_some_and(|e| e.starts_with("http://")));
        // The payload is not part of the signature (UNSIGNED-PAYLOAD): hashing every pack
        // with SHA-256 on both ends would cost more CPU than compressing it, and buys
        // nothing — TLS protects the transfer and every pack is authenticated (AEAD) and
        // named by its hash, which `check` verifies.
        let store = builder
            .with_unsigned_payload(true)
            .with_virtual_hosted_style_request(!(options.path_style || endpoint.is_some()))
            .with_retry(retry)
            .with_client_options(client)
            .build()
            .map_err(|e| S3Error::Config(one_line(&e.to_string())))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("blockproof-s3")
            .enable_all()
            .build()
            .map_err(|e| S3Error::Config(format!("cannot start the S3 client runtime: {e}")))?;
        Ok(S3Backend {
            location,
            store,
            runtime,
            uploads: options.uploads.max(1),
            counts: Arc::new(RequestCounts::default()),
        })
    }

    /// The request counters (shared; they keep counting).
    pub fn counts(&self) -> Arc<RequestCounts> {
        self.counts.clone()
    }

    fn path(&self, kind: Kind, name: &str) -> Result<Path, StoreError> {
        let key = self.location.key(&relative_path(kind, name)?);
        Path::parse(&key).map_err(|e| StoreError::Invalid(format!("invalid object key {key:?}: {e}")))
    }

    fn remote(&self, op: &str, key: &str, e: object_store::Error) -> StoreError {
        StoreError::Remote(format!("s3://{}/{key}: {op} failed: {}", self.location.bucket, one_line(&e.to_string())))
    }

    fn map(&self, op: &str, kind: Kind, name: &str, path: &Path, e: object_store::Error) -> StoreError {
        match e {
            object_store::Error::NotFound { .. } => StoreError::NotFound { kind, name: name.to_string() },
            e => self.remote(op, path.as_ref(), e),
        }
    }

    async fn put_multipart(&self, path: &Path, data: bytes::Bytes) -> Result<(), object_store::Error> {
        let upload = self.store.put_multipart(path).await?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let mut at = 0;
        while at < data.len() {
            if let Err(e) = writer.wait_for_capacity(PARTS_IN_FLIGHT).await {
                let _ = writer.abort().await;
                return Err(e);
            }
            let end = (at + PART_SIZE).min(data.len());
            writer.put(data.slice(at..end));
            RequestCounts::add(&self.counts.multipart_part, 1);
            at = end;
        }
        writer.finish().await.map(|_| ())
    }

    /// One PUT, or a multipart upload above [`MULTIPART_THRESHOLD`]; no copy of `data`.
    fn put(&self, path: &Path, data: bytes::Bytes) -> Result<(), StoreError> {
        RequestCounts::add(&self.counts.bytes_up, data.len() as u64);
        RequestCounts::add(&self.counts.put, 1);
        let result = if data.len() <= MULTIPART_THRESHOLD {
            self.runtime.block_on(self.store.put(path, PutPayload::from(data))).map(|_| ())
        } else {
            self.runtime.block_on(self.put_multipart(path, data))
        };
        result.map_err(|e| self.remote("PUT", path.as_ref(), e))
    }
}

/// Error messages of the HTTP stack span lines; a report line must not.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl Backend for S3Backend {
    fn location(&self) -> String {
        self.location.to_string()
    }

    fn read(&self, kind: Kind, name: &str) -> Result<Vec<u8>, StoreError> {
        let path = self.path(kind, name)?;
        RequestCounts::add(&self.counts.get, 1);
        let bytes = self
            .runtime
            .block_on(async { self.store.get(&path).await?.bytes().await })
            .map_err(|e| self.map("GET", kind, name, &path, e))?;
        RequestCounts::add(&self.counts.bytes_down, bytes.len() as u64);
        // Reuses the response's buffer when it is the only owner (a whole pack, say).
        Ok(Vec::from(bytes))
    }

    fn read_at(&self, kind: Kind, name: &str, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        if buf.is_empty() {
            return Ok(());
        }
        let path = self.path(kind, name)?;
        RequestCounts::add(&self.counts.get, 1);
        let end = offset + buf.len() as u64;
        let bytes = self
            .runtime
            .block_on(self.store.get_range(&path, offset..end))
            .map_err(|e| self.map("GET (range)", kind, name, &path, e))?;
        if bytes.len() != buf.len() {
            return Err(StoreError::Remote(format!(
                "s3://{}/{path}: object too short for {} bytes at offset {offset}",
                self.location.bucket,
                buf.len()
            )));
        }
        RequestCounts::add(&self.counts.bytes_down, bytes.len() as u64);
        buf.copy_from_slice(&bytes);
        Ok(())
    }

    fn size(&self, kind: Kind, name: &str) -> Result<u64, StoreError> {
        let path = self.path(kind, name)?;
        RequestCounts::add(&self.counts.head, 1);
        let meta = self.runtime.block_on(self.store.head(&path)).map_err(|e| self.map("HEAD", kind, name, &path, e))?;
        Ok(meta.size)
    }

    fn modified(&self, kind: Kind, name: &str) -> Result<std::time::SystemTime, StoreError> {
        let path = self.path(kind, name)?;
        RequestCounts::add(&self.counts.head, 1);
        let meta = self.runtime.block_on(self.store.head(&path)).map_err(|e| self.map("HEAD", kind, name, &path, e))?;
        Ok(meta.last_modified.into())
    }

    /// One PUT (or a multipart upload, completed by one final request): S3 makes the
    /// object visible whole or not at all, which is the atomicity rule without a rename.
    fn write(&self, kind: Kind, name: &str, data: &[u8]) -> Result<(), StoreError> {
        self.put(&self.path(kind, name)?, bytes::Bytes::copy_from_slice(data))
    }

    /// Packs are handed over whole: the PUT sends the pack writer's buffer itself.
    fn write_owned(&self, kind: Kind, name: &str, data: Vec<u8>) -> Result<Option<Vec<u8>>, StoreError> {
        self.put(&self.path(kind, name)?, bytes::Bytes::from(data))?;
        Ok(None)
    }

    fn list(&self, kind: Kind) -> Result<Vec<String>, StoreError> {
        Ok(self.list_sizes(kind)?.into_iter().map(|(n, _)| n).collect())
    }

    /// One LIST (paged by the client): S3 returns each object's size with its key.
    fn list_sizes(&self, kind: Kind) -> Result<Vec<(String, u64)>, StoreError> {
        if kind == Kind::Config {
            return match self.size(Kind::Config, "config") {
                Ok(size) => Ok(vec![("config".into(), size)]),
                Err(e) if e.is_not_found() => Ok(vec![]),
                Err(e) => Err(e),
            };
        }
        let dir = Path::from(self.location.key(kind.dir()));
        RequestCounts::add(&self.counts.list, 1);
        let metas: Vec<_> = self
            .runtime
            .block_on(self.store.list(Some(&dir)).try_collect())
            .map_err(|e| self.remote("LIST", dir.as_ref(), e))?;
        // Keys are DIR/NAME, or DIR/XX/NAME for packs; anything else is not ours.
        let depth = dir.parts().count() + if kind == Kind::Pack { 2 } else { 1 };
        Ok(metas
            .into_iter()
            .filter(|m| m.location.parts().count() == depth)
            .filter_map(|m| m.location.filename().map(|n| (n.to_string(), m.size)))
            .filter(|(n, _)| relative_path(kind, n).is_ok())
            .collect())
    }

    fn remove(&self, kind: Kind, name: &str) -> Result<(), StoreError> {
        let path = self.path(kind, name)?;
        RequestCounts::add(&self.counts.delete, 1);
        match self.runtime.block_on(self.store.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.remote("DELETE", path.as_ref(), e)),
        }
    }

    fn parallelism(&self) -> usize {
        self.uploads
    }
}
