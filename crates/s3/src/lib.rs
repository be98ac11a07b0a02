//! # blockproof-s3
//!
//! Repositories on S3-compatible object storage (AWS S3, Ceph RGW, MinIO, Garage, Wasabi,
//! Backblaze B2), as an implementation of blockproof-store's [`Backend`] trait. The
//! layers above — chunking, encryption, verification, locks, gc — are unchanged.
//!
//! ## Model
//!
//! A repository at `s3://BUCKET/PREFIX` is the local directory layout
//! ([`blockproof_store::relative_path`]) under the key prefix: `PREFIX/config`,
//! `PREFIX/keys/…`, `PREFIX/data/XX/…`, `PREFIX/index/…`, `PREFIX/snapshots/…`,
//! `PREFIX/locks/…`, `PREFIX/state/…`. A repository directory copied into a bucket is
//! therefore a valid S3 repository, and the reverse.
//!
//! ## Invariants (how the durability rules of the trait hold without rename)
//!
//! - **Atomic writes**: every file is one PUT under its final name (a multipart upload
//!   above [`backend::MULTIPART_THRESHOLD`], which becomes visible only when completed).
//!   S3 never shows a partial object, so no temporary names and no rename are needed. A
//!   writer killed mid-upload leaves at most an incomplete multipart upload, invisible to
//!   listings; gc aborts those older than an hour by the store's clock
//!   ([`Backend::clean_temporary`], `multipart.rs`: ListMultipartUploads and
//!   AbortMultipartUpload presigned by object_store's own signer), and a bucket
//!   lifecycle rule can do the same.
//! - **Content-derived names**: packs, index files and snapshots are named by the hash of
//!   their bytes, so a retried or repeated PUT writes identical bytes. Snapshots are
//!   committed by writing the manifest last.
//! - **Retries** (`retry.rs`): requests failing with 5xx, 429, timeouts or broken or
//!   refused connections are retried for [`S3Options::retry_timeout`] — time, not count —
//!   with jittered exponential back-off (200 ms doubling to 4 s), going round the
//!   endpoints when several are given ([`S3Options::endpoints`]: failover between the
//!   nodes of a cluster). Then the operation fails with one line naming the object, the
//!   endpoint, what happened in words, how long it was tried and what to try
//!   (`problem.rs`). Requests watch the operation's cancellation token
//!   ([`Backend::observe_cancel`], the repository's `Cancel`): when it is cancelled —
//!   by the operation's first error, or by a request of this store giving up, which
//!   cancels it — requests in flight are abandoned at once, and requests started after
//!   (cleanup) get one round, so a failed operation ends within moments instead of
//!   waiting for its other uploads.
//! - **Eventual listing**: nothing relies on a listing being complete at once. Locks and
//!   gc plans are time-based (see docs/LIFECYCLE.md and docs/OBJECT-STORAGE.md).
//! - **Parallel uploads**: [`Backend::parallelism`] asks the pack writer for
//!   [`S3Options::uploads`] concurrent PUTs to fill the link.

pub mod backend;
mod location;
pub mod multipart;
pub mod problem;
pub mod retry;

pub use backend::{RequestCounts, S3Backend};
pub use blockproof_store::Backend;
pub use location::{S3Location, S3Options};

/// Errors opening an S3 repository.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("{0}")]
    Url(String),
    #[error("S3 configuration: {0}")]
    Config(String),
    #[error("{0} is not a blockproof repository (no config object)")]
    NotARepository(String),
    #[error("{0} already holds objects; refusing to initialise a repository there")]
    NotEmpty(String),
    #[error(transparent)]
    Store(#[from] blockproof_store::StoreError),
}
