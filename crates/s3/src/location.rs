//! Where an S3 repository is and how to reach it.

use std::time::Duration;

use crate::S3Error;

/// `s3://BUCKET/PREFIX`: a bucket and a key prefix (possibly empty) under which the
/// repository's objects live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Location {
    pub bucket: String,
    /// Without leading or trailing slashes; empty for the bucket's root.
    pub prefix: String,
}

impl S3Location {
    /// Whether `s` names an S3 repository (rather than a directory).
    pub fn is_s3_url(s: &str) -> bool {
        s.starts_with("s3://")
    }

    /// Parses `s3://BUCKET[/PREFIX]`.
    pub fn parse(s: &str) -> Result<Self, S3Error> {
        let rest =
            s.strip_prefix("s3://").ok_or_else(|| S3Error::Url(format!("{s:?} is not an s3://BUCKET/PREFIX URL")))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && !bucket.starts_with(['-', '.'])
            && !bucket.ends_with(['-', '.']);
        if !bucket_ok {
            return Err(S3Error::Url(format!(
                "{s:?}: invalid bucket name {bucket:?} (3 to 63 characters of a-z, 0-9, '-' and '.')"
            )));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|p| p == "." || p == "..") || prefix.contains("//") {
            return Err(S3Error::Url(format!("{s:?}: invalid prefix {prefix:?}")));
        }
        Ok(S3Location { bucket: bucket.into(), prefix: prefix.into() })
    }

    /// The object key of a repository-relative path.
    pub fn key(&self, relative: &str) -> String {
        if self.prefix.is_empty() {
            relative.to_string()
        } else {
            format!("{}/{relative}", self.prefix)
        }
    }
}

impl std::fmt::Display for S3Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.prefix.is_empty() {
            write!(f, "s3://{}", self.bucket)
        } else {
            write!(f, "s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// How to reach the store. Credentials and region come from the usual `AWS_*`
/// environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
/// `AWS_SESSION_TOKEN`, `AWS_REGION` or `AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL`).
#[derive(Clone, Debug)]
pub struct S3Options {
    /// `http(s)://host:port` of an S3-compatible service, or of several nodes of one
    /// (a cluster without a load balancer): requests fail over between them. Empty for
    /// AWS (or `AWS_ENDPOINT_URL`).
    pub endpoints: Vec<String>,
    /// Address buckets as `endpoint/bucket/key` rather than `bucket.endpoint/key`.
    /// Always on when an endpoint is given (MinIO, Garage and Ceph expect it).
    pub path_style: bool,
    /// Give up on a request that keeps failing (5xx, timeouts, refused connections)
    /// after this long, retrying with jittered exponential back-off (and on the other
    /// endpoints) until then; see crate::retry.
    pub retry_timeout: Duration,
    /// Whole-object uploads in flight at once.
    pub uploads: usize,
}

impl S3Options {
    /// Default of [`S3Options::retry_timeout`], in seconds.
    pub const DEFAULT_RETRY_TIMEOUT_SECS: u64 = 120;
    /// Default of [`S3Options::uploads`].
    pub const DEFAULT_UPLOADS: u16 = 4;

    /// Checks a list of endpoints: each an `http://` or `https://` URL with a host, at
    /// least one, none twice. Trailing slashes are dropped.
    pub fn parse_endpoints(list: &[String]) -> Result<Vec<String>, S3Error> {
        let mut out: Vec<String> = Vec::new();
        for e in list.iter().map(|e| e.trim().trim_end_matches('/')) {
            let host = e.strip_prefix("http://").or_else(|| e.strip_prefix("https://"));
            if !host.is_some_and(|h| !h.is_empty() && !h.contains(['/', '?', '#', ' '])) {
                return Err(S3Error::Url(format!(
                    "{e:?} is not an S3 endpoint: expected http(s)://HOST[:PORT], several separated by commas"
                )));
            }
            if out.iter().any(|o| o == e) {
                return Err(S3Error::Url(format!("endpoint {e} is listed twice")));
            }
            out.push(e.to_string());
        }
        Ok(out)
    }
}

impl Default for S3Options {
    fn default() -> Self {
        S3Options {
            endpoints: Vec::new(),
            path_style: false,
            retry_timeout: Duration::from_secs(Self::DEFAULT_RETRY_TIMEOUT_SECS),
            uploads: usize::from(Self::DEFAULT_UPLOADS),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bucket_and_prefix() {
        let l = S3Location::parse("s3://backups/site-a/vms/").unwrap();
        assert_eq!((l.bucket.as_str(), l.prefix.as_str()), ("backups", "site-a/vms"));
        assert_eq!(l.key("data/ab/abcd"), "site-a/vms/data/ab/abcd");
        assert_eq!(l.to_string(), "s3://backups/site-a/vms");
        let root = S3Location::parse("s3://backups").unwrap();
        assert_eq!(root.key("config"), "config");
        assert_eq!(root.to_string(), "s3://backups");
        for bad in ["/tmp/repo", "s3://", "s3://A_B/x", "s3://-ab", "s3://ok-bucket/../x", "s3://ok-bucket/a//b"] {
            assert!(S3Location::parse(bad).is_err(), "{bad}");
        }
        assert!(S3Location::is_s3_url("s3://x") && !S3Location::is_s3_url("/s3://x"));
    }

    #[test]
    fn parses_endpoint_lists() {
        let list = |s: &[&str]| S3Options::parse_endpoints(&s.iter().map(|x| x.to_string()).collect::<Vec<_>>());
        assert_eq!(
            list(&["http://10.0.0.5:3900/", " https://s3.example.org "]).unwrap(),
            vec!["http://10.0.0.5:3900".to_string(), "https://s3.example.org".to_string()]
        );
        assert_eq!(list(&[]).unwrap(), Vec::<String>::new());
        for bad in [&["10.0.0.5:3900"][..], &["http://"], &["http://a/b"], &["http://a", "http://a/"], &[""]] {
            assert!(list(bad).is_err(), "{bad:?}");
        }
    }
}
