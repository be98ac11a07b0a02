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
//! than the given age ago by the store's clock — gc passes its age for temporary files
//! (one hour): no pack upload of a running process takes that long, and nothing but a
//! pack is ever uploaded in parts.

use std::time::{Duration, SystemTime};

use blockproof_store::{Kind, StoreError};
use object_store::client::{HttpRequest, HttpRequestBody};
use object_store::path::Path;
use object_store::signer::{Method, SignedUrlOptions, Signer};
use serde::Deserialize;

use crate::backend::{RequestCounts, S3Backend};
use crate::problem::Problem;
use crate::retry::Endpoint;

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

/// Sends one presigned request; returns the body of a successful answer.
async fn send(ep: Endpoint, method: Method, path: Path, query: Vec<(String, String)>) -> Result<Vec<u8>, Problem> {
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
    let body = response.into_body().bytes().await.map_err(|e| Problem::of_transport(&e))?;
    if status.is_success() {
        Ok(body.to_vec())
    } else {
        Err(Problem::of_status(status.as_u16(), &String::from_utf8_lossy(&body)))
    }
}

/// Every incomplete upload under `prefix`.
pub fn list(backend: &S3Backend, prefix: &str) -> Result<Vec<Upload>, StoreError> {
    let mut out = Vec::new();
    let mut marker: Option<(String, String)> = None;
    loop {
        RequestCounts::add(&backend.counts().list, 1);
        let mut query = vec![("uploads".to_string(), String::new()), ("prefix".to_string(), prefix.to_string())];
        if let Some((key, id)) = &marker {
            query.push(("key-marker".into(), key.clone()));
            query.push(("upload-id-marker".into(), id.clone()));
        }
        let body = backend
            .block_raw("LIST multipart uploads", prefix, |ep| {
                send(ep.clone(), Method::GET, Path::from(""), query.clone())
            })
            .map_err(|f| backend.failure(Kind::Pack, "", f))?;
        let page = parse_page(&String::from_utf8_lossy(&body))
            .map_err(|e| StoreError::Remote(format!("s3://{}/{prefix}: {e}", backend.location_ref().bucket)))?;
        out.extend(page.uploads);
        match page.next {
            Some(next) if marker.as_ref() != Some(&next) => marker = Some(next),
            _ => return Ok(out),
        }
    }
}

/// Aborts the incomplete uploads of packs started more than `age` ago; returns how many.
pub fn abort_stale(backend: &S3Backend, age: Duration) -> Result<u64, StoreError> {
    let prefix = backend.location_ref().key(&format!("{}/", Kind::Pack.dir()));
    let cutoff = SystemTime::now().checked_sub(age).unwrap_or(SystemTime::UNIX_EPOCH);
    let mut aborted = 0;
    for upload in list(backend, &prefix)? {
        let stale = upload.initiated.is_some_and(|t| t <= cutoff);
        if !stale || !upload.key.starts_with(&prefix) {
            continue;
        }
        let path = Path::parse(&upload.key)
            .map_err(|e| StoreError::Invalid(format!("invalid object key {:?}: {e}", upload.key)))?;
        RequestCounts::add(&backend.counts().delete, 1);
        let query = vec![("uploadId".to_string(), upload.id.clone())];
        match backend.block_raw("ABORT multipart upload", &upload.key, |ep| {
            send(ep.clone(), Method::DELETE, path.clone(), query.clone())
        }) {
            // Gone already (completed, or aborted by another gc): nothing to do.
            Ok(_) | Err(crate::retry::Failure::NotFound) => aborted += 1,
            Err(f) => return Err(backend.failure(Kind::Pack, "", f)),
        }
    }
    Ok(aborted)
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
