//! Incomplete multipart uploads: listed and aborted by garbage collection.
//!
//! A process killed in the middle of a multipart upload (a pack above
//! [`MULTIPART_THRESHOLD`](crate::backend::MULTIPART_THRESHOLD)) leaves parts that no
//! object listing shows but that the bucket stores (and bills). `object_store` can start,
//! complete and abort its own uploads but cannot list anybody's, so two requests are made
//! beside it: `ListMultipartUploads` (`GET /BUCKET/?uploads&prefix=PREFIX/data/`, paged by
//! key and upload-id markers) and `AbortMultipartUpload` (`DELETE /BUCKET/KEY?uploadId=ID`).
//!
//! **Signing.** Neither request is signed by hand: object_store's own SigV4 signer
//! ([`Signer::signed_url_opts`], which folds extra query parameters into the signature)
//! presigns each URL with the same credentials, region and endpoint as every other
//! request, and object_store's HTTP client (the reqwest client it is built on) sends it.
//! So there is no second S3 stack and no signing code of ours. The answers are parsed
//! with quick-xml, which object_store already uses for its own listings.
//!
//! **Which uploads go.** Only those under the repository's `data/` prefix, started more
//! than the given age ago — by the store's clock: the `Initiated` time of an upload is
//! compared with the `Date` of the answer that listed it, never with this host's clock,
//! so a host whose clock runs ahead cannot take a running backup's upload for an old one
//! (a store that sends no `Date` has nothing aborted). gc passes its age for temporary
//! files (one hour), and no attempt of an upload lasts that long
//! ([`ATTEMPT_MAX`](crate::retry::ATTEMPT_MAX); a retry starts a new upload): nothing but
//! a pack is ever uploaded in parts.
//!
//! **A hostile endpoint** cannot make gc hold more than [`BODY_MAX`] bytes of one answer,
//! nor list for ever: a listing that repeats a page marker or exceeds [`MAX_PAGES`] pages
//! is an error.

use std::time::{Duration, SystemTime};

use blockproof_store::{Kind, StoreError};
use futures_util::TryStreamExt;
use object_store::client::{HttpRequest, HttpRequestBody};
use object_store::path::Path;
use object_store::signer::{Method, SignedUrlOptions, Signer};
use serde::Deserialize;

use crate::backend::{RequestCounts, S3Backend};
use crate::problem::Problem;
use crate::retry::{Client, Endpoint, Failure};
use crate::S3Location;

/// How long a presigned URL of ours stays valid (it is used at once).
const URL_LIFETIME: Duration = Duration::from_secs(15 * 60);

/// One incomplete upload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upload {
    pub key: String,
    pub id: String,
    /// When it was started (the store's clock); `None` when the store did not say in a
    /// form we read — such an upload is never aborted.
    pub initiated: Option<SystemTime>,
}

/// One page of `ListMultipartUploads`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Page {
    pub uploads: Vec<Upload>,
    /// Where the next page starts, when the listing is truncated.
    pub next: Option<(String, String)>,
}

/// Parses a `ListMultipartUploadsResult` document.
pub fn parse_page(xml: &str) -> Result<Page, String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Doc {
        #[serde(default)]
        is_truncated: bool,
        #[serde(default)]
        next_key_marker: Option<String>,
        #[serde(default)]
        next_upload_id_marker: Option<String>,
        #[serde(default, rename = "Upload")]
        uploads: Vec<UploadDoc>,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct UploadDoc {
        key: String,
        upload_id: String,
        #[serde(default)]
        initiated: Option<String>,
    }
    let doc: Doc = quick_xml::de::from_str(xml).map_err(|e| format!("unreadable ListMultipartUploads answer: {e}"))?;
    let uploads = doc
        .uploads
        .into_iter()
        .map(|u| Upload {
            key: u.key,
            id: u.upload_id,
            initiated: u.initiated.and_then(|t| humantime::parse_rfc3339_weak(t.trim()).ok()),
        })
        .collect();
    let next = match (doc.is_truncated, doc.next_key_marker, doc.next_upload_id_marker) {
        (true, Some(k), Some(u)) => Some((k, u)),
        (true, _, _) => return Err("a truncated ListMultipartUploads answer without next markers".into()),
        _ => None,
    };
    Ok(Page { uploads, next })
}

/// The largest answer of ours that is read (a page of `ListMultipartUploads` holds at
/// most 1000 uploads, well under 1 MiB): a hostile or broken endpoint cannot make gc
/// hold more.
pub const BODY_MAX: usize = 8 << 20;

/// How many pages of `ListMultipartUploads` one gc reads at most (at 1000 uploads a
/// page): an endpoint whose listing never ends cannot keep gc going for ever.
pub const MAX_PAGES: usize = 10_000;

/// Sends one presigned request; returns the body of a successful answer (at most
/// [`BODY_MAX`] bytes) and the store's clock (its `Date` header), when it gave one.
async fn send(
    ep: Endpoint,
    method: Method,
    path: Path,
    query: Vec<(String, String)>,
) -> Result<(Vec<u8>, Option<SystemTime>), Problem> {
    let url = ep
        .store
        .signed_url_opts(method.clone(), &path, URL_LIFETIME, &SignedUrlOptions::new().with_query(query))
        .await
        .map_err(|e| Problem::of_store(&e))?;
    let mut request = HttpRequest::new(HttpRequestBody::empty());
    *request.method_mut() = method;
    *request.uri_mut() = url.as_str().parse().map_err(|e| Problem::of_status(400, &format!("bad URL {url}: {e}")))?;
    let response = ep.http.execute(request).await.map_err(|e| Problem::of_transport(&e))?;
    let status = response.status();
    let date = response.headers().get("date").and_then(|d| d.to_str().ok()).and_then(http_date);
    let mut stream = response.into_body().bytes_stream();
    let mut body = Vec::new();
    while let Some(piece) = stream.try_next().await.map_err(|e| Problem::of_transport(&e))? {
        if body.len() + piece.len() > BODY_MAX {
            return Err(Problem::too_long(BODY_MAX));
        }
        body.extend_from_slice(&piece);
    }
    if status.is_success() {
        Ok((body, date))
    } else {
        Err(Problem::of_status(status.as_u16(), &String::from_utf8_lossy(&body)))
    }
}

/// An HTTP date (`Wed, 02 Dec 2026 01:58:10 GMT`).
fn http_date(text: &str) -> Option<SystemTime> {
    chrono::DateTime::parse_from_rfc2822(text.trim()).ok().map(SystemTime::from)
}

/// One page of the incomplete uploads under `prefix`, from `marker` on, and the store's
/// clock when it answered.
async fn list_page(
    client: &Client,
    bucket: &str,
    prefix: &str,
    marker: Option<&(String, String)>,
) -> Result<(Page, Option<SystemTime>), StoreError> {
    RequestCounts::add(&client.counts.list, 1);
    let mut query = vec![("uploads".to_string(), String::new()), ("prefix".to_string(), prefix.to_string())];
    if let Some((key, id)) = marker {
        query.push(("key-marker".into(), key.clone()));
        query.push(("upload-id-marker".into(), id.clone()));
    }
    let object = format!("s3://{bucket}/{prefix}");
    let (body, date) = client
        .call("LIST multipart uploads", &object, 0, |ep| send(ep.clone(), Method::GET, Path::from(""), query.clone()))
        .await
        .map_err(|f| failure(f, &object))?;
    let page = parse_page(&String::from_utf8_lossy(&body)).map_err(|e| StoreError::Remote(format!("{object}: {e}")))?;
    Ok((page, date))
}

fn failure(f: Failure, object: &str) -> StoreError {
    match f {
        Failure::NotFound => StoreError::Remote(format!("{object}: the bucket answered 404 Not Found")),
        Failure::Failed(msg) => StoreError::Remote(msg),
    }
}

/// The pages of the incomplete uploads under a prefix, one request each. A listing that
/// repeats a page marker, or goes on for more than [`MAX_PAGES`] pages, is an error: it
/// would never end.
struct Pages<'a> {
    client: &'a Client,
    bucket: &'a str,
    prefix: &'a str,
    /// Where the next page starts (`None`: at the first).
    marker: Option<(String, String)>,
    seen: std::collections::HashSet<(String, String)>,
    done: bool,
}

impl<'a> Pages<'a> {
    fn new(client: &'a Client, bucket: &'a str, prefix: &'a str) -> Self {
        Pages { client, bucket, prefix, marker: None, seen: Default::default(), done: false }
    }

    /// The next page and the store's clock when it answered; `None` after the last.
    async fn next(&mut self) -> Result<Option<(Vec<Upload>, Option<SystemTime>)>, StoreError> {
        if self.done {
            return Ok(None);
        }
        let what = || format!("s3://{}/{}: ListMultipartUploads", self.bucket, self.prefix);
        if self.seen.len() >= MAX_PAGES {
            return Err(StoreError::Remote(format!("{} did not end after {MAX_PAGES} pages", what())));
        }
        let (page, date) = list_page(self.client, self.bucket, self.prefix, self.marker.as_ref()).await?;
        match page.next {
            None => self.done = true,
            Some(next) => {
                if !self.seen.insert(next.clone()) {
                    return Err(StoreError::Remote(format!(
                        "{} repeats its page marker {:?}: the listing would never end",
                        what(),
                        next.0
                    )));
                }
                self.marker = Some(next);
            }
        }
        Ok(Some((page.uploads, date)))
    }
}

/// Every incomplete upload under `prefix`.
pub async fn list_uploads(client: &Client, bucket: &str, prefix: &str) -> Result<Vec<Upload>, StoreError> {
    let mut out = Vec::new();
    let mut pages = Pages::new(client, bucket, prefix);
    while let Some((uploads, _)) = pages.next().await? {
        out.extend(uploads);
    }
    Ok(out)
}

/// Aborts the incomplete uploads of the repository's packs started more than `age` ago
/// by the store's own clock (the `Date` of its answer, so a host whose clock is ahead
/// never takes a running backup's upload for an old one; a store that gives no date has
/// nothing aborted); returns how many.
pub async fn abort_stale_uploads(client: &Client, location: &S3Location, age: Duration) -> Result<u64, StoreError> {
    let prefix = location.key(&format!("{}/", Kind::Pack.dir()));
    let mut aborted = 0;
    let mut pages = Pages::new(client, &location.bucket, &prefix);
    while let Some((uploads, store_now)) = pages.next().await? {
        let Some(cutoff) = store_now.map(|now| now.checked_sub(age).unwrap_or(SystemTime::UNIX_EPOCH)) else {
            continue;
        };
        for upload in uploads {
            let stale = upload.initiated.is_some_and(|t| t <= cutoff);
            if !stale || !upload.key.starts_with(&prefix) {
                continue;
            }
            let path = Path::parse(&upload.key)
                .map_err(|e| StoreError::Invalid(format!("invalid object key {:?}: {e}", upload.key)))?;
            RequestCounts::add(&client.counts.delete, 1);
            let query = vec![("uploadId".to_string(), upload.id.clone())];
            let object = format!("s3://{}/{}", location.bucket, upload.key);
            match client
                .call("ABORT multipart upload", &object, 0, |ep| {
                    send(ep.clone(), Method::DELETE, path.clone(), query.clone())
                })
                .await
            {
                // Gone already (completed, or aborted by another gc): nothing to do.
                Ok(_) | Err(Failure::NotFound) => aborted += 1,
                Err(f) => return Err(failure(f, &object)),
            }
        }
    }
    Ok(aborted)
}

/// Every incomplete upload under `prefix` of `backend`'s bucket.
pub fn list(backend: &S3Backend, prefix: &str) -> Result<Vec<Upload>, StoreError> {
    backend.run(list_uploads(backend.client(), &backend.location_ref().bucket, prefix))
}

/// [`abort_stale_uploads`] of `backend`'s repository.
pub fn abort_stale(backend: &S3Backend, age: Duration) -> Result<u64, StoreError> {
    backend.run(abort_stale_uploads(backend.client(), backend.location_ref(), age))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_listing() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListMultipartUploadsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Bucket>b</Bucket>
<KeyMarker></KeyMarker><UploadIdMarker></UploadIdMarker><NextKeyMarker>p/data/ab/abcd</NextKeyMarker>
<NextUploadIdMarker>u2</NextUploadIdMarker><Prefix>p/data/</Prefix><MaxUploads>2</MaxUploads>
<IsTruncated>true</IsTruncated>
<Upload><Key>p/data/12/1234</Key><UploadId>u1</UploadId><Initiator><ID>x</ID></Initiator>
<StorageClass>STANDARD</StorageClass><Initiated>2026-12-02T01:58:10.269Z</Initiated></Upload>
<Upload><Key>p/data/ab/abcd</Key><UploadId>u&amp;2</UploadId><Initiated>not a time</Initiated></Upload>
</ListMultipartUploadsResult>"#;
        let page = parse_page(xml).unwrap();
        assert_eq!(page.next, Some(("p/data/ab/abcd".into(), "u2".into())));
        assert_eq!(page.uploads.len(), 2);
        assert_eq!(page.uploads[0].key, "p/data/12/1234");
        let t = page.uploads[0].initiated.unwrap();
        assert_eq!(humantime::format_rfc3339_millis(t).to_string(), "2026-12-02T01:58:10.269Z");
        assert_eq!((page.uploads[1].id.as_str(), page.uploads[1].initiated), ("u&2", None));
        let empty =
            parse_page("<ListMultipartUploadsResult><IsTruncated>false</IsTruncated></ListMultipartUploadsResult>");
        assert_eq!(empty.unwrap(), Page::default());
        assert!(parse_page("<ListMultipartUploadsResult><IsTruncated>true</IsTruncated></ListMultipartUploadsResult>")
            .is_err());
        assert!(parse_page("not xml").is_err());
    }
}
