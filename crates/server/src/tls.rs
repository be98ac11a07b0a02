//! TLS: the server's certificate (given, or self-signed on first start) and the
//! fingerprint clients pin.
//!
//! Only TLS 1.3 is offered. A self-signed certificate is generated once into
//! `STATE/tls/` (key mode 0600) for `localhost`, `127.0.0.1`, `::1` and the names given
//! with `--name`, and reused on later starts, so a fingerprint clients pinned stays
//! valid until an admin replaces the files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::ServerError;

/// The SHA-256 fingerprint of a certificate, as `sha256:<64 hex digits>`.
pub fn fingerprint(der: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    format!("sha256:{}", hex::encode(digest.as_ref()))
}

/// A fingerprint as a user may type it (with or without `sha256:`, colons, any case),
/// as the 32 bytes it names.
pub fn parse_fingerprint(text: &str) -> Option<[u8; 32]> {
    let t = text.trim();
    let t = t.strip_prefix("sha256:").or_else(|| t.strip_prefix("SHA256:")).unwrap_or(t);
    let hexdigits: String = t.chars().filter(|c| *c != ':').collect();
    let bytes = hex::decode(hexdigits.to_ascii_lowercase()).ok()?;
    bytes.try_into().ok()
}

/// Where the certificate and key come from.
pub struct Identity {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Generated on this start.
    pub generated: bool,
}

/// The given files, or the state directory's self-signed pair (generated if missing).
pub fn identity(
    state_dir: &Path,
    cert: Option<&Path>,
    key: Option<&Path>,
    names: &[String],
) -> Result<Identity, ServerError> {
    match (cert, key) {
        (Some(c), Some(k)) => return Ok(Identity { cert: c.into(), key: k.into(), generated: false }),
        (None, None) => {}
        _ => return Err(ServerError::Config("--cert and --key go together".into())),
    }
    let dir = state_dir.join("tls");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    if cert.exists() && key.exists() {
        return Ok(Identity { cert, key, generated: false });
    }
    let mut sans: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    sans.extend(names.iter().cloned());
    let made = rcgen::generate_simple_self_signed(sans)
        .map_err(|e| ServerError::Config(format!("cannot generate a certificate: {e}")))?;
    crate::files::write_atomic(&key, made.signing_key.serialize_pem().as_bytes(), 0o600)?;
    crate::files::write_atomic(&cert, made.cert.pem().as_bytes(), 0o644)?;
    Ok(Identity { cert, key, generated: true })
}

/// The rustls configuration of an identity, and the fingerprint of its certificate.
pub fn server_config(identity: &Identity) -> Result<(Arc<rustls::ServerConfig>, String), ServerError> {
    let bad = |path: &Path, e: String| ServerError::Config(format!("{}: {e}", path.display()));
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&identity.cert)
        .map_err(|e| bad(&identity.cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(&identity.cert, e.to_string()))?;
    let Some(leaf) = certs.first() else { return Err(bad(&identity.cert, "no certificate in the file".into())) };
    let print = fingerprint(leaf);
    let key = PrivateKeyDer::from_pem_file(&identity.key).map_err(|e| bad(&identity.key, e.to_string()))?;
    let mut config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| ServerError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| bad(&identity.cert, e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((Arc::new(config), print))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_identity_is_kept_and_its_fingerprint_parses() {
        let dir = tempfile::tempdir().unwrap();
        let first = identity(dir.path(), None, None, &["backup.example".into()]).unwrap();
        assert!(first.generated);
        let (_, print) = server_config(&first).unwrap();
        let again = identity(dir.path(), None, None, &[]).unwrap();
        assert!(!again.generated);
        assert_eq!(server_config(&again).unwrap().1, print);
        let bytes = parse_fingerprint(&print).unwrap();
        let colons: Vec<String> = bytes.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(parse_fingerprint(&colons.join(":")), Some(bytes));
        assert_eq!(parse_fingerprint("sha256:00"), None);
        assert!(identity(dir.path(), Some(Path::new("/x")), None, &[]).is_err());
    }
}
