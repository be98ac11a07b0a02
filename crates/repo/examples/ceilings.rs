//! The machine's per-core ceilings for the stages of a backup, on the same data the
//! benchmark uses: keyed BLAKE3, zstd level 1, LZ4, sealing with each AEAD, and the
//! whole per-chunk work of a backup worker (hash, compress, seal) with each codec. Prints one line per stage,
//! in MB/s of plaintext on one core.
//!
//! ```text
//! cargo run --release -p blockproof-repo --example ceilings -- IMAGE [MIB=256]
//! ```

use std::io::Read;
use std::time::Instant;

use blockproof_crypto::{Keys, MasterSecret};
use blockproof_format::{BlobKind, Codec};
use blockproof_repo::BlobCodec;

const CHUNK: usize = 65536;

fn rate(label: &str, bytes: usize, f: impl FnOnce()) {
    let t = Instant::now();
    f();
    let s = t.elapsed().as_secs_f64();
    println!("{label:<40} {:>8.0} MB/s", bytes as f64 / s / 1e6);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args.first().expect("usage: ceilings IMAGE [MIB]");
    let mib: usize = args.get(1).map_or(256, |m| m.parse().expect("MiB"));
    let mut data = vec![0u8; mib << 20];
    let mut f = std::fs::File::open(path).expect("open image");
    let n = f.read(&mut data).expect("read image");
    data.truncate(n - n % CHUNK);
    // Only non-zero chunks reach these stages in a backup.
    let chunks: Vec<&[u8]> = data.chunks(CHUNK).filter(|c| c.iter().any(|&b| b != 0)).collect();
    let bytes = chunks.len() * CHUNK;
    let keys = Keys::from_secret(&MasterSecret([9; 64]), blockproof_format::FORMAT_VERSION);
    println!("{} non-zero 64 KiB chunks ({} MiB) of {path}, one core:", chunks.len(), bytes >> 20);
    rate("keyed BLAKE3", bytes, || {
        for c in &chunks {
            std::hint::black_box(keys.blob_id(c));
        }
    });
    rate("zstd level 1 (compress every chunk)", bytes, || {
        let mut z = zstd::bulk::Compressor::new(1).unwrap();
        for c in &chunks {
            std::hint::black_box(z.compress(c).unwrap());
        }
    });
    rate("LZ4 (compress every chunk)", bytes, || {
        let mut out = vec![0u8; lz4::block::compress_bound(CHUNK).unwrap()];
        for c in &chunks {
            std::hint::black_box(lz4::block::compress_to_buffer(c, None, false, &mut out).unwrap());
        }
    });
    for version in [1, 2] {
        let keys = Keys::from_secret(&MasterSecret([9; 64]), version);
        rate(&format!("{:?} seal", keys.aead()), bytes, || {
            for c in &chunks {
                std::hint::black_box(keys.seal(b"ad", c));
            }
        });
    }
    for (codec, label) in
        [(Codec::Lz4, "worker: hash + LZ4 + seal"), (Codec::Zstd, "worker: hash + zstd -1 (sampled) + seal")]
    {
        rate(label, bytes, || {
            let mut codec = BlobCodec::new(keys.clone(), codec, 1);
            for c in &chunks {
                let id = codec.keys().blob_id(c);
                std::hint::black_box(codec.seal(BlobKind::Data, id, c));
            }
        });
    }
}
