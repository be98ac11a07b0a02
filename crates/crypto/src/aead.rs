//! The two AEADs with 192-bit random nonces, each built from standard halves on aws-lc.
//!
//! Both take a 256-bit key and a 24-byte nonce and produce `nonce | ciphertext | tag(16)`,
//! so a repository's byte layout does not depend on which one it uses.
//!
//! - **XChaCha20-Poly1305** (draft-irtf-cfrg-xchacha-03; format version 1, and key slots
//!   in every version): the IETF ChaCha20-Poly1305 of RFC 8439 under the subkey
//!   `HChaCha20(K, N[0..16])` with the nonce `0u32 || N[16..24]`. The subkey comes from
//!   the `chacha20` crate's `hchacha`; the bulk work is aws-lc's assembly.
//! - **XAES-256-GCM** (C2SP, <https://c2sp.org/XAES-256-GCM>; format version 2): AES-256-GCM
//!   under a per-nonce key `AES_K(M1 ⊕ K1) || AES_K(M2 ⊕ K1)`, where `K1` is the CMAC
//!   subkey of `K` and `M1`, `M2` are `00 01 'X' 00 || N[0..12]` and `00 02 'X' 00 ||
//!   N[0..12]`, with the nonce `N[12..24]`. Random 192-bit nonces are as safe as with
//!   XChaCha20, and AES-GCM on AES-NI and carry-less multiplication runs about four times
//!   faster than ChaCha20-Poly1305 on the benchmark machine (docs/BENCHMARKS.md); the
//!   per-nonce key costs two AES blocks and a GCM key set-up, nothing next to a chunk.
//!
//! The test vectors of both specifications pin the bytes, and the fixture repositories
//! (`tests/fixtures/repo-v1`, `repo-v2`) must still open.

use std::sync::Arc;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, CHACHA20_POLY1305};
use aws_lc_rs::cipher::{EncryptingKey, UnboundCipherKey, AES_256};
use blockproof_format::{NONCE_LEN, SEAL_OVERHEAD, TAG_LEN};
use chacha20::cipher::consts::U10;
use rand::RngCore;

use crate::CryptoError;

/// Which AEAD a key seals with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Aead {
    XChaCha20Poly1305,
    XAes256Gcm,
}

/// A 256-bit key of one of the two AEADs.
#[derive(Clone)]
pub struct SealKey(Inner);

#[derive(Clone)]
enum Inner {
    XChaCha([u8; 32]),
    XAes(Arc<XAesKey>),
}

/// AES-256 under the key (for the per-nonce key derivation) and the CMAC subkey K1.
struct XAesKey {
    aes: EncryptingKey,
    k1: [u8; 16],
}

impl XAesKey {
    fn new(key: &[u8; 32]) -> Self {
        let aes = EncryptingKey::ecb(UnboundCipherKey::new(&AES_256, key).expect("32-byte AES-256 key"))
            .expect("AES-256 ECB");
        let mut l = [0u8; 16];
        aes.encrypt(&mut l).expect("one block");
        // K1 = L << 1, reduced by x^128 + x^7 + x^2 + x + 1 when the top bit falls off.
        let v = u128::from_be_bytes(l);
        let k1 = (v << 1) ^ if v >> 127 == 1 { 0x87 } else { 0 };
        XAesKey { aes, k1: k1.to_be_bytes() }
    }

    fn gcm(&self, nonce: &[u8; NONCE_LEN]) -> (LessSafeKey, Nonce) {
        let mut blocks = [0u8; 32];
        for (i, m) in blocks.chunks_exact_mut(16).enumerate() {
            m[..4].copy_from_slice(&[0, i as u8 + 1, b'X', 0]);
            m[4..].copy_from_slice(&nonce[..12]);
            for (b, k) in m.iter_mut().zip(self.k1) {
                *b ^= k;
            }
        }
        self.aes.encrypt(&mut blocks).expect("two blocks");
        let key = UnboundKey::new(&AES_256_GCM, &blocks).expect("32-byte AES-256-GCM key");
        let n: [u8; 12] = nonce[12..].try_into().expect("24-byte nonce");
        (LessSafeKey::new(key), Nonce::assume_unique_for_key(n))
    }
}

impl SealKey {
    pub fn new(aead: Aead, key: [u8; 32]) -> Self {
        SealKey(match aead {
            Aead::XChaCha20Poly1305 => Inner::XChaCha(key),
            Aead::XAes256Gcm => Inner::XAes(Arc::new(XAesKey::new(&key))),
        })
    }

    pub fn aead(&self) -> Aead {
        match self.0 {
            Inner::XChaCha(_) => Aead::XChaCha20Poly1305,
            Inner::XAes(_) => Aead::XAes256Gcm,
        }
    }

    /// The RFC 8439 / SP 800-38D key and 96-bit nonce used for `nonce`.
    fn inner(&self, nonce: &[u8; NONCE_LEN]) -> (LessSafeKey, Nonce) {
        match &self.0 {
            Inner::XChaCha(k) => {
                let head: &[u8; 16] = nonce[..16].try_into().expect("24-byte nonce");
                let subkey = chacha20::hchacha::<U10>(&(*k).into(), head.into());
                let key = UnboundKey::new(&CHACHA20_POLY1305, &subkey).expect("32-byte ChaCha20 key");
                let mut n = [0u8; 12];
                n[4..].copy_from_slice(&nonce[16..]);
                (LessSafeKey::new(key), Nonce::assume_unique_for_key(n))
            }
            Inner::XAes(k) => k.gcm(nonce),
        }
    }

    /// Seals `plaintext` under a fresh random nonce, appending `nonce | ciphertext | tag`.
    pub fn seal_into(&self, ad: &[u8], plaintext: &[u8], out: &mut Vec<u8>) {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        self.seal_with_nonce(&nonce, ad, plaintext, out);
    }

    fn seal_with_nonce(&self, nonce: &[u8; NONCE_LEN], ad: &[u8], plaintext: &[u8], out: &mut Vec<u8>) {
        out.reserve(plaintext.len() + SEAL_OVERHEAD);
        out.extend_from_slice(nonce);
        let start = out.len();
        out.extend_from_slice(plaintext);
        let (key, n) = self.inner(nonce);
        let tag = key
            .seal_in_place_separate_tag(n, Aad::from(ad), &mut out[start..])
            .expect("the AEAD accepts any length below 64 GiB");
        out.extend_from_slice(tag.as_ref());
    }

    /// Opens `nonce | ciphertext | tag`, returning the plaintext only if authentic.
    pub fn open(&self, ad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(CryptoError::Authentication);
        }
        let (nonce, ct_and_tag) = sealed.split_at(NONCE_LEN);
        let (key, n) = self.inner(nonce.try_into().expect("split at NONCE_LEN"));
        let mut buf = ct_and_tag.to_vec();
        key.open_in_place(n, Aad::from(ad), &mut buf).map_err(|_| CryptoError::Authentication)?;
        buf.truncate(buf.len() - TAG_LEN);
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hex that may be wrapped over several lines.
    fn unhex(s: &str) -> Vec<u8> {
        hex::decode(s.split_whitespace().collect::<String>()).unwrap()
    }

    fn check_vector(aead: Aead, key: &str, nonce: &[u8; 24], ad: &[u8], plaintext: &[u8], ct: &str, tag: &str) {
        let (ct, tag) = (unhex(ct), unhex(tag));
        let k = SealKey::new(aead, unhex(key).try_into().unwrap());
        let mut out = Vec::new();
        k.seal_with_nonce(nonce, ad, plaintext, &mut out);
        assert_eq!(&out[..24], nonce);
        assert_eq!(&out[24..24 + ct.len()], &ct[..], "{aead:?} ciphertext");
        assert_eq!(&out[24 + ct.len()..], &tag[..], "{aead:?} tag");
        assert_eq!(k.open(ad, &out).unwrap(), plaintext);
        for i in [0, 24, out.len() - 1] {
            let mut bad = out.clone();
            bad[i] ^= 1;
            assert_eq!(k.open(ad, &bad), Err(CryptoError::Authentication), "{aead:?} flipped byte {i}");
        }
        assert_eq!(k.open(b"other ad", &out), Err(CryptoError::Authentication));
    }

    /// draft-irtf-cfrg-xchacha-03, appendix A.3.1.
    #[test]
    fn xchacha20_poly1305_test_vector() {
        check_vector(
            Aead::XChaCha20Poly1305,
            "808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f",
            &unhex("404142434445464748494a4b4c4d4e4f5051525354555657").try_into().unwrap(),
            &unhex("50515253c0c1c2c3c4c5c6c7"),
            b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.",
            "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb
             731c7f1b0b4aa6440bf3a82f4eda7e39ae64c6708c54c216cb96b72e1213b452
             2f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9
             21f9664c97637da9768812f615c68b13b52e",
            "c0875924c1c7987947deafd8780acf49",
        );
    }

    /// The two vectors of the C2SP XAES-256-GCM specification.
    #[test]
    fn xaes_256_gcm_test_vectors() {
        check_vector(
            Aead::XAes256Gcm,
            "0101010101010101010101010101010101010101010101010101010101010101",
            b"ABCDEFGHIJKLMNOPQRSTUVWX",
            b"",
            b"XAES-256-GCM",
            "ce546ef63c9cc60765923609",
            "b33a9a1974e96e52daf2fcf7075e2271",
        );
        check_vector(
            Aead::XAes256Gcm,
            "0303030303030303030303030303030303030303030303030303030303030303",
            b"ABCDEFGHIJKLMNOPQRSTUVWX",
            b"c2sp.org/XAES-256-GCM",
            b"XAES-256-GCM",
            "986ec1832593df5443a17943",
            "7fd083bf3fdb41abd740a21f71eb769d",
        );
    }

    #[test]
    fn the_two_aeads_do_not_open_each_other() {
        let a = SealKey::new(Aead::XChaCha20Poly1305, [5; 32]);
        let b = SealKey::new(Aead::XAes256Gcm, [5; 32]);
        let mut sealed = Vec::new();
        a.seal_into(b"ad", b"payload", &mut sealed);
        assert_eq!(b.open(b"ad", &sealed), Err(CryptoError::Authentication));
        let mut sealed = Vec::new();
        b.seal_into(b"ad", b"payload", &mut sealed);
        assert_eq!(a.open(b"ad", &sealed), Err(CryptoError::Authentication));
        assert_eq!(b.open(b"ad", &sealed).unwrap(), b"payload");
    }
}
