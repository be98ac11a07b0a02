//! A repository for this crate's unit tests: in a temporary directory, with the cheapest
//! key derivation (the tests measure nothing of it).

use blockproof_repo::Repository;

/// A fresh repository in `dir` (password `pw`).
pub(crate) fn in_dir(dir: &std::path::Path) -> Repository {
    let opts = blockproof_repo::InitOptions {
        kdf: blockproof_format::KdfParams::MIN,
        ..blockproof_repo::InitOptions::default()
    };
    let backend = blockproof_store::LocalBackend::create(dir).expect("a temporary directory");
    Repository::init(Box::new(backend), b"pw", &opts).expect("a repository")
}
