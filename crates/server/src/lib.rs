//! # blockproof-server
//!
//! A repository server: serves repositories (each on any [`blockproof_store::Backend`] —
//! a directory, S3) over HTTPS to clients holding tokens, so that a backup host that is
//! broken into cannot destroy the history it backs up. The server is a gateway, not a
//! storage engine, and it never sees plaintext: blobs, index files, snapshots and the
//! repository key stay sealed end to end; the server stores the bytes clients send.
//!
//! ## Model
//!
//! - **Routes** ([`route`]): `/v1/<repository>/o/<kind>/<name>` with GET (read, a range),
//!   HEAD (size, receipt time), PUT (write), DELETE (remove); a listing per kind; the
//!   trash. One pure parser, property-tested.
//! - **Tokens** ([`token`]): per name a role and a repository pattern, stored hashed in
//!   `STATE/tokens.json`, reloaded when the file changes (a revocation holds on the next
//!   request).
//! - **Roles** ([`policy`]): backup, restore, maintain, admin; one pure function decides
//!   every request on a file.
//! - **Trash** ([`trash`]): whatever a request removes or replaces, locks aside, is kept
//!   on the server for the grace period, whoever asked; only time purges it.
//! - **Audit** ([`audit`]): a JSON line per change, refusal and failed authentication.
//! - **Client** ([`client`]): [`client::RemoteBackend`], the storage trait over a server,
//!   with the certificate pinned by fingerprint or checked against a CA.
//!
//! ## Invariants
//!
//! 1. A backup or restore token can never remove or replace a file, whatever it sends,
//!    but its own locks; a backup token's vm heads and confirmation summaries are replaced with the old version in
//!    the trash. Content-addressed files (packs, index files, snapshots, key slots) are
//!    written only under the BLAKE3 hash of their bytes, which the server checks, so no
//!    token can put other bytes under an existing name.
//! 2. Nothing leaves the repository without first being durable in the trash (locks
//!    aside), and nothing is purged from the trash before its grace period is over.
//! 3. `HEAD` reports the time the store received a file, which the client cannot set;
//!    [`blockproof_store::Backend::receipt_times`] tells retention to judge snapshots by
//!    it.
//! 4. Writes reach the store through [`blockproof_store::Backend::write`], atomic and
//!    durable: a server killed at any moment leaves whole files or none.

pub mod audit;
pub mod client;
mod files;
pub mod policy;
mod records;
pub mod route;
mod server;
mod service;
pub mod tls;
pub mod token;
pub mod trash;

pub use client::{ClientOptions, RemoteBackend};
pub use policy::Role;
pub use server::{serve, Options, Started};

use std::path::Path;

/// Errors of the server's own configuration and state.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{0}")]
    Config(String),
    #[error("{path}: {source}")]
    Io { path: std::path::PathBuf, source: std::io::Error },
    #[error("cannot listen on {0}: {1}")]
    Listen(String, std::io::Error),
}

impl ServerError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> ServerError {
        ServerError::Io { path: path.to_path_buf(), source }
    }
}
