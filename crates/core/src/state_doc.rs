//! Sealed JSON state documents of one kind (FORMAT §20: detection events, restore-test
//! records), read the same tolerant way: every document whose name has the kind's
//! prefix, strictly parsed; one that cannot be read or parsed is skipped with a warning
//! (one damaged document never hides the others), and one removed between the listing
//! and the read is skipped in silence.

use blockproof_format::ObjectMagic;
use blockproof_repo::{RepoError, Repository};
use blockproof_store::Kind;
use serde::de::DeserializeOwned;

use crate::CoreError;

/// Every document named `prefix…`, and a warning per skipped one (`what`: the kind, as
/// the warning names it).
pub(crate) fn read_all<T: DeserializeOwned>(
    repo: &Repository,
    prefix: &str,
    what: &str,
) -> Result<(Vec<T>, Vec<String>), CoreError> {
    let mut out = Vec::new();
    let mut warnings = Vec::new();
    for n in repo.backend().list(Kind::State)? {
        if !n.starts_with(prefix) {
            continue;
        }
        let bytes = match repo.read_doc(Kind::State, ObjectMagic::State, &n) {
            Ok(b) => b,
            // Gone between the listing and the read (a concurrent prune): nothing to say.
            Err(RepoError::Store(e)) if e.is_not_found() => continue,
            Err(e) => {
                warnings.push(format!("skipped a {what} that cannot be read: {e}"));
                continue;
            }
        };
        match serde_json::from_slice::<T>(&bytes) {
            Ok(t) => out.push(t),
            Err(e) => warnings.push(format!("skipped a {what} that cannot be read: {what} {n}: {e}")),
        }
    }
    Ok((out, warnings))
}
