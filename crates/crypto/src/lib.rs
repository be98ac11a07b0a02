//! # blockproof-crypto
//!
//! The keys of a blockproof repository and the three things done with them.
//!
//! ## Model
//!
//! - A repository has one random 64-byte **master secret**, made at `init`. It never
//!   leaves memory unwrapped: each **key slot** ([`keyslot`]) holds it sealed under a key
//!   derived from a passphrase with Argon2id. Any slot opens the repository.
//! - Three 32-byte keys are derived from the master secret with BLAKE3's `derive_key`
//!   (domain-separated contexts, see [`Keys::from_secret`]):
//!   - the **sealing key** for the repository's AEAD ([`aead`]), which encrypts and
//!     authenticates every object but the repository id and the key slots:
//!     XChaCha20-Poly1305 in format version 1, XAES-256-GCM from version 2 (each with its
//!     own derivation context, so one key never serves two algorithms);
//!   - the **id key** for keyed BLAKE3, which names chunks: ids reveal nothing about
//!     content to someone without the key, and equal plaintexts get equal ids, which is
//!     what deduplication needs;
//!   - the **name key** for keyed BLAKE3 of names ([`Keys::name_id`]): a state document
//!     about a vm is named by it, so the name tells nothing of the vm to someone without
//!     the key.
//!
//! ## Why 192-bit random nonces (XChaCha20-Poly1305, then XAES-256-GCM)
//!
//! A repository seals one blob per new chunk, forever, from many hosts at once, with one
//! key. With 96-bit random nonces (AES-GCM, ChaCha20-Poly1305) the collision risk reaches
//! the usual 2^-32 bound after about 2^32 messages — 256 TiB of 64 KiB chunks, reachable by
//! a large repository, and a nonce collision under GCM leaks the authentication key.
//! 192-bit nonces make random nonces safe for any realistic number of messages (2^-32
//! after ~2^80), with no counter state to coordinate between writers. XChaCha20 gets
//! there with HChaCha20 and is constant-time in software on every CPU; XAES-256-GCM gets
//! there with a per-nonce AES key (two AES blocks) and runs at AES-GCM's speed on CPUs
//! with AES instructions (every x86-64 and ARMv8 server of the last decade), which is
//! why format version 2 uses it for the sealing key. Key slots keep XChaCha20-Poly1305
//! in every version: they are read before the version is known.
//!
//! ## Invariants
//!
//! - `open` fails with [`CryptoError::Authentication`] on any flipped bit in the nonce,
//!   ciphertext, tag or associated data; it never returns unauthenticated bytes.
//! - Sealed layout: `nonce(24) | ciphertext | tag(16)` ([`blockproof_format::SEAL_OVERHEAD`]).

pub mod aead;
pub mod keyslot;

use blockproof_format::{Id, SEAL_OVERHEAD};
use rand::RngCore;

pub use aead::{Aead, SealKey};

pub use keyslot::{create_slot, open_slot};

/// Length of the master secret.
pub const MASTER_SECRET_LEN: usize = blockproof_format::keyslot::MASTER_SECRET_LEN;

/// BLAKE3 `derive_key` contexts (pinned: changing one makes every repository unreadable).
pub const SEAL_KEY_CONTEXT: &str = "blockproof 2026-11-22 repository sealing key v1";
/// The sealing key's context from format version 2 (XAES-256-GCM).
pub const SEAL_KEY_CONTEXT_V2: &str = "blockproof 2026-12-01 repository sealing key v2 XAES-256-GCM";
pub const ID_KEY_CONTEXT: &str = "blockproof 2026-11-22 chunk id key v1";
/// The context of the key that names state documents after what they are about.
pub const NAME_KEY_CONTEXT: &str = "blockproof 2026-12-03 state document name key v1";
/// Context of the key that authenticates the local blob-index cache (FORMAT §22).
pub const CACHE_KEY_CONTEXT: &str = "blockproof 2026-12-04 local blob index cache key v1";

/// Errors of the crypto layer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("authentication failed: the data was modified or belongs elsewhere")]
    Authentication,
    #[error("wrong password: no key slot opens with it")]
    WrongPassword,
    #[error("key derivation failed: {0}")]
    Kdf(String),
}

/// The random master secret of a repository.
pub struct MasterSecret(pub [u8; MASTER_SECRET_LEN]);

impl MasterSecret {
    pub fn random() -> Self {
        let mut s = [0u8; MASTER_SECRET_LEN];
        rand::rngs::OsRng.fill_bytes(&mut s);
        MasterSecret(s)
    }
}

/// The working keys derived from the master secret.
#[derive(Clone)]
pub struct Keys {
    cipher: SealKey,
    id_key: [u8; 32],
    name_key: [u8; 32],
    cache_key: [u8; 32],
}

impl Keys {
    /// The keys of a repository of format `version` (1: XChaCha20-Poly1305; 2 and later:
    /// XAES-256-GCM). The id key is the same in every version.
    pub fn from_secret(secret: &MasterSecret, version: u16) -> Self {
        let (context, aead) = if version < 2 {
            (SEAL_KEY_CONTEXT, Aead::XChaCha20Poly1305)
        } else {
            (SEAL_KEY_CONTEXT_V2, Aead::XAes256Gcm)
        };
        let seal = blake3::derive_key(context, &secret.0);
        let id_key = blake3::derive_key(ID_KEY_CONTEXT, &secret.0);
        let name_key = blake3::derive_key(NAME_KEY_CONTEXT, &secret.0);
        let cache_key = blake3::derive_key(CACHE_KEY_CONTEXT, &secret.0);
        Keys { cipher: SealKey::new(aead, seal), id_key, name_key, cache_key }
    }

    /// The AEAD of the sealing key.
    pub fn aead(&self) -> Aead {
        self.cipher.aead()
    }

    /// The id of a blob: keyed BLAKE3 of its plaintext.
    pub fn blob_id(&self, plaintext: &[u8]) -> Id {
        Id(*blake3::keyed_hash(&self.id_key, plaintext).as_bytes())
    }

    /// The keyed BLAKE3 of a name (a vm name) under the name key: the same in every
    /// version and for every session of the repository, and meaningless without the key.
    pub fn name_id(&self, name: &str) -> Id {
        Id(*blake3::keyed_hash(&self.name_key, name.as_bytes()).as_bytes())
    }

    /// A keyed BLAKE3 hasher under the cache key: it authenticates the local cache of
    /// the blob index, which only a holder of the master secret can then forge. The same
    /// in every version.
    pub fn cache_hasher(&self) -> blake3::Hasher {
        blake3::Hasher::new_keyed(&self.cache_key)
    }

    /// Seals `plaintext`, appending `nonce | ciphertext | tag` to `out`.
    pub fn seal_into(&self, ad: &[u8], plaintext: &[u8], out: &mut Vec<u8>) {
        self.cipher.seal_into(ad, plaintext, out)
    }

    /// Seals `plaintext` into a new buffer.
    pub fn seal(&self, ad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(plaintext.len() + SEAL_OVERHEAD);
        self.seal_into(ad, plaintext, &mut out);
        out
    }

    /// Opens `nonce | ciphertext | tag`, returning the plaintext only if authentic.
    pub fn open(&self, ad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.cipher.open(ad, sealed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys::from_secret(&MasterSecret([7u8; 64]), blockproof_format::FORMAT_VERSION)
    }

    #[test]
    fn each_version_seals_with_its_own_aead_and_key() {
        let v1 = Keys::from_secret(&MasterSecret([7u8; 64]), 1);
        let v2 = Keys::from_secret(&MasterSecret([7u8; 64]), 2);
        assert_eq!(v1.aead(), Aead::XChaCha20Poly1305);
        assert_eq!(v2.aead(), Aead::XAes256Gcm);
        assert_eq!(v1.blob_id(b"chunk"), v2.blob_id(b"chunk"), "ids do not depend on the version");
        let sealed = v1.seal(b"ad", b"payload");
        assert_eq!(v2.open(b"ad", &sealed), Err(CryptoError::Authentication));
        // The version 2 sealing key is derived under its own context (pinned here).
        let direct = SealKey::new(Aead::XAes256Gcm, blake3::derive_key(SEAL_KEY_CONTEXT_V2, &[7u8; 64]));
        assert_eq!(direct.open(b"ad", &v2.seal(b"ad", b"payload")).unwrap(), b"payload");
        assert_eq!(SEAL_KEY_CONTEXT_V2, "blockproof 2026-12-01 repository sealing key v2 XAES-256-GCM");
    }

    #[test]
    fn seal_open_round_trip_and_tamper_detection() {
        for version in [1, 2] {
            let k = Keys::from_secret(&MasterSecret([7u8; 64]), version);
            let sealed = k.seal(b"ad", b"hello world");
            assert_eq!(sealed.len(), 11 + SEAL_OVERHEAD);
            assert_eq!(k.open(b"ad", &sealed).unwrap(), b"hello world");
            assert_eq!(k.open(b"other ad", &sealed), Err(CryptoError::Authentication));
            for i in 0..sealed.len() {
                let mut bad = sealed.clone();
                bad[i] ^= 0x01;
                assert_eq!(k.open(b"ad", &bad), Err(CryptoError::Authentication), "flip at {i}");
            }
            assert_eq!(k.open(b"ad", &sealed[..10]), Err(CryptoError::Authentication));
            let other = Keys::from_secret(&MasterSecret([8u8; 64]), version);
            assert_eq!(other.open(b"ad", &sealed), Err(CryptoError::Authentication));
        }
    }

    #[test]
    fn nonces_are_fresh() {
        let k = keys();
        let n = blockproof_format::NONCE_LEN;
        assert_ne!(k.seal(b"", b"x")[..n], k.seal(b"", b"x")[..n]);
    }

    #[test]
    fn blob_ids_are_keyed_and_pinned() {
        let k = keys();
        let id = k.blob_id(b"chunk");
        assert_eq!(id, k.blob_id(b"chunk"));
        assert_ne!(id, Keys::from_secret(&MasterSecret([8u8; 64]), 2).blob_id(b"chunk"));
        assert_ne!(id.0, *blake3::hash(b"chunk").as_bytes());
        // Pins the derivation: same secret, same id, in every future version.
        let expected = blake3::keyed_hash(&blake3::derive_key(ID_KEY_CONTEXT, &[7u8; 64]), b"chunk");
        assert_eq!(id.0, *expected.as_bytes());
        // ... and as literal bytes, so a changed context string fails here too.
        assert_eq!(format!("{id}"), "6e221070010e8ddf49facd49b2d7a2f77251a757b785e33e30f53104a2ab093b");
    }

    #[test]
    fn name_ids_are_keyed_pinned_and_apart_from_blob_ids() {
        let k = keys();
        let id = k.name_id("vm1");
        assert_eq!(id, Keys::from_secret(&MasterSecret([7u8; 64]), 1).name_id("vm1"), "the same in every version");
        assert_ne!(id, k.name_id("vm2"));
        assert_ne!(id, k.blob_id(b"vm1"), "a name never shares an id with a chunk of the same bytes");
        assert_ne!(id, Keys::from_secret(&MasterSecret([8u8; 64]), 2).name_id("vm1"));
        let expected = blake3::keyed_hash(&blake3::derive_key(NAME_KEY_CONTEXT, &[7u8; 64]), b"vm1");
        assert_eq!(id.0, *expected.as_bytes());
        assert_eq!(NAME_KEY_CONTEXT, "blockproof 2026-12-03 state document name key v1");
        // ... and as literal bytes: a head named in one build is found by every later one.
        assert_eq!(format!("{id}"), "6e6422c002d1fcca5371b92606cb41fb6748822c37a091089ebe94b0b20f9218");
    }

    #[test]
    fn the_cache_key_is_pinned_and_apart_from_the_other_keys() {
        let k = keys();
        let mac = |k: &Keys| *k.cache_hasher().update(b"page").finalize().as_bytes();
        assert_eq!(mac(&k), mac(&Keys::from_secret(&MasterSecret([7u8; 64]), 1)), "the same in every version");
        assert_ne!(mac(&k), mac(&Keys::from_secret(&MasterSecret([8u8; 64]), 2)));
        assert_ne!(mac(&k), k.blob_id(b"page").0);
        assert_ne!(mac(&k), k.name_id("page").0);
        assert_eq!(CACHE_KEY_CONTEXT, "blockproof 2026-12-04 local blob index cache key v1");
        let expected = blake3::keyed_hash(&blake3::derive_key(CACHE_KEY_CONTEXT, &[7u8; 64]), b"page");
        assert_eq!(mac(&k), *expected.as_bytes());
    }
}
