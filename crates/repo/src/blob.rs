//! Sealing and opening blobs.

use blockproof_crypto::Keys;
use blockproof_format::pack::blob_ad;
use blockproof_format::{BlobEntry, BlobKind, Codec, Compression, Id, SEAL_OVERHEAD};

use crate::RepoError;

/// A blob ready to be appended to a pack.
pub struct SealedBlob {
    pub kind: BlobKind,
    pub id: Id,
    pub compression: Compression,
    /// Plaintext length.
    pub raw_length: u32,
    /// `nonce | ciphertext | tag`.
    pub bytes: Vec<u8>,
}

/// A compressor with its reusable state.
enum Compressor {
    Zstd(Box<zstd::bulk::Compressor<'static>>),
    Lz4,
}

impl Compressor {
    /// Whether a large blob is first tried on a 4 KiB sample: zstd yes (compressing
    /// random data whole costs it as much as text), LZ4 no (it skips through
    /// incompressible input at about 8 GB/s, faster than the sample would save).
    fn samples_first(&self) -> bool {
        matches!(self, Compressor::Zstd(_))
    }

    fn compression(&self) -> Compression {
        match self {
            Compressor::Zstd(_) => Compression::Zstd,
            Compressor::Lz4 => Compression::Lz4,
        }
    }

    /// Compresses `input` into `out`, returning the compressed length (None if the
    /// codec failed, which only an undersized buffer could cause).
    fn compress(&mut self, input: &[u8], out: &mut Vec<u8>) -> Option<usize> {
        match self {
            Compressor::Zstd(z) => {
                out.clear();
                out.reserve(zstd::zstd_safe::compress_bound(input.len()));
                z.compress_to_buffer(input, out).ok()
            }
            Compressor::Lz4 => {
                // The buffer only grows, so it is zero-filled once per thread, not per blob.
                let bound = lz4::block::compress_bound(input.len()).ok()?;
                if out.len() < bound {
                    out.resize(bound, 0);
                }
                lz4::block::compress_to_buffer(input, None, false, out).ok()
            }
        }
    }
}

/// Per-thread compression and sealing state (a zstd context is not shared between
/// threads; each pipeline worker owns one codec).
pub struct BlobCodec {
    keys: Keys,
    compressor: Compressor,
    scratch: Vec<u8>,
}

impl BlobCodec {
    /// A codec compressing with `codec` (`zstd_level` applies to zstd only).
    pub fn new(keys: Keys, codec: Codec, zstd_level: i32) -> Self {
        let compressor = match codec {
            Codec::Zstd => Compressor::Zstd(Box::new(
                zstd::bulk::Compressor::new(zstd_level).expect("zstd accepts the levels the config validates"),
            )),
            Codec::Lz4 => Compressor::Lz4,
        };
        BlobCodec { keys, compressor, scratch: Vec::new() }
    }

    /// The codec a repository's settings ask for.
    pub fn for_repo(repo: &crate::Repository) -> Self {
        let config = repo.config();
        Self::new(repo.keys().clone(), config.compression, config.zstd_level)
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Whether compressing `plaintext` is worth trying: with a compressor that samples
    /// first, a large blob whose first 4 KiB do not compress by 1/32 is taken for
    /// incompressible (random, encrypted or already compressed data) and stored as is — a
    /// quarter of a typical disk, at a sixteenth of the cost of compressing it whole.
    fn worth_compressing(&mut self, plaintext: &[u8]) -> bool {
        const SAMPLE: usize = 4096;
        if plaintext.len() < 4 * SAMPLE || !self.compressor.samples_first() {
            return true;
        }
        matches!(self.compressor.compress(&plaintext[..SAMPLE], &mut self.scratch), Some(n) if n < SAMPLE - SAMPLE / 32)
    }

    /// Compresses (when that saves at least 1/32) and seals a blob whose id is known.
    pub fn seal(&mut self, kind: BlobKind, id: Id, plaintext: &[u8]) -> SealedBlob {
        let compressed = if self.worth_compressing(plaintext) {
            self.compressor
                .compress(plaintext, &mut self.scratch)
                .filter(|&n| n < plaintext.len() - plaintext.len() / 32)
        } else {
            None
        };
        let (compression, body) = match compressed {
            Some(n) => (self.compressor.compression(), &self.scratch[..n]),
            None => (Compression::None, plaintext),
        };
        let mut bytes = Vec::with_capacity(body.len() + SEAL_OVERHEAD);
        self.keys.seal_into(&blob_ad(kind, &id), body, &mut bytes);
        SealedBlob { kind, id, compression, raw_length: plaintext.len() as u32, bytes }
    }
}

/// Opens a sealed blob described by `entry`: authenticates, decompresses and re-hashes it.
/// `where_` names the blob's place for error messages.
pub fn open_blob(keys: &Keys, entry: &BlobEntry, sealed: &[u8], where_: &str) -> Result<Vec<u8>, RepoError> {
    let what = || format!("blob {} ({where_})", entry.id);
    let body = keys.open(&blob_ad(entry.kind, &entry.id), sealed).map_err(|e| RepoError::corrupt(what(), e))?;
    let plain = match entry.compression {
        Compression::None => body,
        Compression::Zstd => zstd::bulk::decompress(&body, entry.raw_length as usize)
            .map_err(|e| RepoError::corrupt(what(), format!("decompression failed: {e}")))?,
        Compression::Lz4 => i32::try_from(entry.raw_length)
            .map_err(|e| e.to_string())
            .and_then(|len| lz4::block::decompress(&body, Some(len)).map_err(|e| e.to_string()))
            .map_err(|e| RepoError::corrupt(what(), format!("decompression failed: {e}")))?,
    };
    if plain.len() != entry.raw_length as usize {
        return Err(RepoError::corrupt(what(), format!("{} bytes, index says {}", plain.len(), entry.raw_length)));
    }
    if keys.blob_id(&plain) != entry.id {
        return Err(RepoError::corrupt(what(), "content does not match its id"));
    }
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockproof_crypto::MasterSecret;

    fn entry_for(b: &SealedBlob) -> BlobEntry {
        BlobEntry {
            kind: b.kind,
            compression: b.compression,
            id: b.id,
            offset: 0,
            length: b.bytes.len() as u32,
            raw_length: b.raw_length,
        }
    }

    #[test]
    fn compressible_and_random_blobs_round_trip_with_every_codec() {
        let keys = Keys::from_secret(&MasterSecret([1; 64]), blockproof_format::FORMAT_VERSION);
        for (codec, expect) in [(Codec::Zstd, Compression::Zstd), (Codec::Lz4, Compression::Lz4)] {
            let mut codec = BlobCodec::new(keys.clone(), codec, 1);
            let text = b"the quick brown fox ".repeat(1000);
            let id = keys.blob_id(&text);
            let b = codec.seal(BlobKind::Data, id, &text);
            assert_eq!(b.compression, expect);
            assert!(b.bytes.len() < text.len() / 4);
            assert_eq!(open_blob(&keys, &entry_for(&b), &b.bytes, "test").unwrap(), text);

            let mut random = vec![0u8; 65536];
            blake3::Hasher::new().finalize_xof().fill(&mut random);
            let b = codec.seal(BlobKind::Data, keys.blob_id(&random), &random);
            assert_eq!(b.compression, Compression::None, "incompressible data is stored as is");
            assert_eq!(open_blob(&keys, &entry_for(&b), &b.bytes, "test").unwrap(), random);

            // A compressed blob whose recorded length is wrong fails to decompress, clearly.
            let b = codec.seal(BlobKind::Data, id, &text);
            let mut e = entry_for(&b);
            e.raw_length -= 1;
            let err = open_blob(&keys, &e, &b.bytes, "test").unwrap_err().to_string();
            assert!(err.contains("decompression failed") || err.contains("bytes, index says"), "{err}");
        }
    }

    #[test]
    fn wrong_kind_or_id_or_bytes_fail() {
        let keys = Keys::from_secret(&MasterSecret([1; 64]), blockproof_format::FORMAT_VERSION);
        let mut codec = BlobCodec::new(keys.clone(), Codec::Zstd, 1);
        let data = vec![5u8; 1000];
        let b = codec.seal(BlobKind::Data, keys.blob_id(&data), &data);
        let mut e = entry_for(&b);
        e.kind = BlobKind::Tree;
        assert!(open_blob(&keys, &e, &b.bytes, "t").is_err());
        let mut e = entry_for(&b);
        e.id = Id([9; 32]);
        assert!(open_blob(&keys, &e, &b.bytes, "t").is_err());
        let mut bytes = b.bytes.clone();
        bytes[30] ^= 4;
        assert!(open_blob(&keys, &entry_for(&b), &bytes, "t").is_err());
        // A blob sealed under a wrong id (a writer bug) is caught by the re-hash.
        let liar = codec.seal(BlobKind::Data, Id([7; 32]), &data);
        assert!(open_blob(&keys, &entry_for(&liar), &liar.bytes, "t")
            .unwrap_err()
            .to_string()
            .contains("does not match"));
    }
}
