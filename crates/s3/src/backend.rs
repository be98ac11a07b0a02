//! [`S3Backend`]: the storage trait over an S3 bucket.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blockproof_store::{relative_path, Backend, Kind, StoreError};
use futures_util::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};

use crate::problem::Problem;
use crate::retry::{Client, Endpoint, Failure};
use crate::{S3Error, S3Location, S3Options};

/// Objects up to this size are written with one PUT; larger ones by multipart upload.
pub const MULTIPART_THRESHOLD: usize = 64 << 20;
/// The part size of multipart uploads.
pub const PART_SIZE: usize = 16 << 20;
/// Parts of one multipart upload in flight at once.
const PARTS_IN_FLIGHT: usize = 4;

/// Requests sent so far, by kind (retries not counted, but counted apart): the figures
/// of the cost model.
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
    /// Attempts beyond the first of each request (on the same or another endpoint).
    pub retries: AtomicU64,
}

impl RequestCounts {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
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
            ("retries", l(&self.retries)),
        ]
    }
}

/// A repository under `s3://BUCKET/PREFIX`. The synchronous [`Backend`] calls run on a
/// small private tokio runtime; any number of threads may call at once. Every request
/// goes through [`Client::call`] (crate::retry): retried for the retry timeout, failing
/// over between the endpoints, abandoned when the store has been found failing.
pub struct S3Backend {
    location: S3Location,
    client: Client,
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
            .block("LIST", &b.location.prefix, 0, |s| {
                let prefix = prefix.clone();
                async move { s.list(prefix.as_ref()).try_next().await.map_err(|e| Problem::of_store(&e)) }
            })
            .map_err(|f| b.failure(Kind::Config, "", f))?;
        if first.is_some() {
            return Err(S3Error::NotEmpty(b.location.to_string()));
        }
        Ok(b)
    }

    fn connect(location: S3Location, options: &S3Options) -> Result<Self, S3Error> {
        // The endpoints in effect: the option's, else what `from_env` takes from the
        // environment (AWS_ENDPOINT_URL), else AWS. They decide plain HTTP and path-style
        // addressing.
        let env_endpoint = ["AWS_ENDPOINT_URL", "AWS_ENDPOINT"].iter().find_map(|v| std::env::var(v).ok());
        let endpoints: Vec<Option<String>> = if options.endpoints.is_empty() {
            vec![None]
        } else {
            options.endpoints.iter().cloned().map(Some).collect()
        };
        let mut clients = Vec::new();
        for endpoint in endpoints {
            let effective = endpoint.clone().or_else(|| env_endpoint.clone());
            let mut builder = AmazonS3Builder::from_env().with_bucket_name(&location.bucket);
            if let Some(e) = &endpoint {
                builder = builder.with_endpoint(e);
            }
            if std::env::var_os("AWS_REGION").is_none() && std::env::var_os("AWS_DEFAULT_REGION").is_none() {
                builder = builder.with_region("us-east-1");
            }
            clients.push(Endpoint::new(builder, effective, options.path_style)?);
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("blockproof-s3")
            .enable_all()
            .build()
            .map_err(|e| S3Error::Config(format!("cannot start the S3 client runtime: {e}")))?;
        let counts = Arc::new(RequestCounts::default());
        Ok(S3Backend {
            location,
            client: Client::new(clients, options.retry_timeout, counts.clone()),
            runtime,
            uploads: options.uploads.max(1),
            counts,
        })
    }

    /// The request counters (shared; they keep counting).
    pub fn counts(&self) -> Arc<RequestCounts> {
        self.counts.clone()
    }

    pub(crate) fn location_ref(&self) -> &S3Location {
        &self.location
    }

    fn path(&self, kind: Kind, name: &str) -> Result<Path, StoreError> {
        let key = self.location.key(&relative_path(kind, name)?);
        Path::parse(&key).map_err(|e| StoreError::Invalid(format!("invalid object key {key:?}: {e}")))
    }

    /// Runs one request (see crate::retry) to completion on the runtime. `attempt` gets
    /// its own handle on the endpoint's client, so its future borrows nothing.
    pub(crate) fn block<T, F, Fut>(&self, op: &str, key: &str, bytes: u64, attempt: F) -> Result<T, Failure>
    where
        F: Fn(AmazonS3) -> Fut,
        Fut: Future<Output = Result<T, Problem>>,
    {
        let object = format!("s3://{}/{key}", self.location.bucket);
        self.runtime.block_on(self.client.call(op, &object, bytes, |e| attempt(e.store.clone())))
    }

    /// Runs a future of this store's requests to completion on its runtime.
    pub(crate) fn run<T>(&self, future: impl Future<Output = T>) -> T {
        self.runtime.block_on(future)
    }

    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    pub(crate) fn failure(&self, kind: Kind, name: &str, f: Failure) -> StoreError {
        match f {
            Failure::NotFound => StoreError::NotFound { kind, name: name.to_string() },
            Failure::Failed(msg) => StoreError::Remote(msg),
        }
    }

    /// One PUT, or a multipart upload above [`MULTIPART_THRESHOLD`]; no copy of `data`.
    fn put(&self, kind: Kind, name: &str, data: bytes::Bytes) -> Result<(), StoreError> {
        let path = self.path(kind, name)?;
        let len = data.len() as u64;
        RequestCounts::add(&self.counts.bytes_up, len);
        RequestCounts::add(&self.counts.put, 1);
        let counts = self.counts.clone();
        self.block("PUT", path.as_ref(), len, |s| {
            let (path, data, counts) = (path.clone(), data.clone(), counts.clone());
            async move {
                let r = if data.len() <= MULTIPART_THRESHOLD {
                    s.put(&path, PutPayload::from(data)).await.map(|_| ())
                } else {
                    put_multipart(&s, &path, data, &counts).await
                };
                r.map_err(|e| Problem::of_store(&e))
            }
        })
        .map_err(|f| self.failure(kind, name, f))
    }
}

/// A multipart upload of [`PART_SIZE`] parts, [`PARTS_IN_FLIGHT`] at once; aborted when
/// a part fails (a process killed meanwhile leaves it to gc, crate::multipart).
async fn put_multipart(
    store: &AmazonS3,
    path: &Path,
    data: bytes::Bytes,
    counts: &RequestCounts,
) -> Result<(), object_store::Error> {
    let upload = store.put_multipart(path).await?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
    let mut at = 0;
    while at < data.len() {
        if let Err(e) = writer.wait_for_capacity(PARTS_IN_FLIGHT).await {
            let _ = writer.abort().await;
            return Err(e);
        }
        let end = (at + PART_SIZE).min(data.len());
        writer.put(data.slice(at..end));
        RequestCounts::add(&counts.multipart_part, 1);
        at = end;
    }
    writer.finish().await.map(|_| ())
}

impl Backend for S3Backend {
    fn location(&self) -> String {
        self.location.to_string()
    }

    fn read(&self, kind: Kind, name: &str) -> Result<Vec<u8>, StoreError> {
        let path = self.path(kind, name)?;
        RequestCounts::add(&self.counts.get, 1);
        let bytes = self
            .block("GET", path.as_ref(), 0, |s| {
                let path = path.clone();
                async move {
                    async { s.get(&path).await?.bytes().await }
                        .await
                        .map_err(|e: object_store::Error| Problem::of_store(&e))
                }
            })
            .map_err(|f| self.failure(kind, name, f))?;
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
            .block("GET (range)", path.as_ref(), buf.len() as u64, |s| {
                let path = path.clone();
                async move { s.get_range(&path, offset..end).await.map_err(|e| Problem::of_store(&e)) }
            })
            .map_err(|f| self.failure(kind, name, f))?;
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
        Ok(self.head(kind, name)?.size)
    }

    fn modified(&self, kind: Kind, name: &str) -> Result<std::time::SystemTime, StoreError> {
        Ok(self.head(kind, name)?.last_modified.into())
    }

    /// One PUT (or a multipart upload, completed by one final request): S3 makes the
    /// object visible whole or not at all, which is the atomicity rule without a rename.
    fn write(&self, kind: Kind, name: &str, data: &[u8]) -> Result<(), StoreError> {
        self.put(kind, name, bytes::Bytes::copy_from_slice(data))
    }

    /// Packs are handed over whole: the PUT sends the pack writer's buffer itself.
    fn write_owned(&self, kind: Kind, name: &str, data: Vec<u8>) -> Result<Option<Vec<u8>>, StoreError> {
        self.put(kind, name, bytes::Bytes::from(data))?;
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
            .block("LIST", dir.as_ref(), 0, |s| {
                let dir = dir.clone();
                async move { s.list(Some(&dir)).try_collect::<Vec<_>>().await.map_err(|e| Problem::of_store(&e)) }
            })
            .map_err(|f| self.failure(kind, "", f))?;
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
        match self.block("DELETE", path.as_ref(), 0, |s| {
            let path = path.clone();
            async move { s.delete(&path).await.map_err(|e| Problem::of_store(&e)) }
        }) {
            Ok(()) | Err(Failure::NotFound) => Ok(()),
            Err(f) => Err(self.failure(kind, name, f)),
        }
    }

    /// Aborts the incomplete multipart uploads of packs older than `age`: what a process
    /// killed in the middle of one left (crate::multipart). Returns how many.
    fn clean_temporary(&self, age: Duration) -> Result<u64, StoreError> {
        crate::multipart::abort_stale(self, age)
    }

    /// Requests in flight are abandoned when `cancel` is; a request that gives up after
    /// the retry timeout cancels it (crate::retry).
    fn observe_cancel(&self, cancel: &blockproof_work::Cancel) {
        self.client.observe(cancel);
    }

    fn parallelism(&self) -> usize {
        self.uploads
    }
}

impl S3Backend {
    fn head(&self, kind: Kind, name: &str) -> Result<object_store::ObjectMeta, StoreError> {
        let path = self.path(kind, name)?;
        RequestCounts::add(&self.counts.head, 1);
        self.block("HEAD", path.as_ref(), 0, |s| {
            let path = path.clone();
            async move { s.head(&path).await.map_err(|e| Problem::of_store(&e)) }
        })
        .map_err(|f| self.failure(kind, name, f))
    }
}
