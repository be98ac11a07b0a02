//! Microbenchmarks of the per-chunk stages of a backup and a restore (criterion):
//! keyed hash, compression (LZ4 and zstd -1) and sealing of a compressible and of a
//! random 64 KiB chunk, and opening (authenticate, decompress, re-hash) a sealed one.
//!
//! `cargo bench -p blockproof-repo --bench chunk_pipeline`

use blockproof_crypto::{Keys, MasterSecret};
use blockproof_format::{BlobEntry, BlobKind, Codec};
use blockproof_repo::blob::open_blob;
use blockproof_repo::BlobCodec;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn chunks() -> [(&'static str, Vec<u8>); 2] {
    let text: Vec<u8> = (0..65536u32).map(|i| b"backup restore snapshot block disk "[(i as usize * 7) % 35]).collect();
    let mut x = 0x9e3779b97f4a7c15u64;
    let random: Vec<u8> = (0..65536)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    [("text", text), ("random", random)]
}

fn stages(c: &mut Criterion) {
    let keys = Keys::from_secret(&MasterSecret([3; 64]), blockproof_format::FORMAT_VERSION);
    let mut g = c.benchmark_group("chunk");
    g.throughput(Throughput::Bytes(65536));
    for (name, data) in chunks() {
        g.bench_with_input(BenchmarkId::new("keyed_blake3", name), &data, |b, d| b.iter(|| keys.blob_id(d)));
        let id = keys.blob_id(&data);
        for (codec_name, codec) in [("lz4", Codec::Lz4), ("zstd", Codec::Zstd)] {
            let mut codec = BlobCodec::new(keys.clone(), codec, 1);
            g.bench_with_input(BenchmarkId::new(format!("compress_and_seal_{codec_name}"), name), &data, |b, d| {
                b.iter(|| codec.seal(BlobKind::Data, id, d))
            });
            let sealed = codec.seal(BlobKind::Data, id, &data);
            let entry = BlobEntry {
                kind: sealed.kind,
                compression: sealed.compression,
                id: sealed.id,
                offset: 0,
                length: sealed.bytes.len() as u32,
                raw_length: sealed.raw_length,
            };
            g.bench_with_input(BenchmarkId::new(format!("open_{codec_name}"), name), &sealed.bytes, |b, s| {
                b.iter(|| open_blob(&keys, &entry, s, "bench").unwrap())
            });
        }
    }
    g.finish();
}

criterion_group!(benches, stages);
criterion_main!(benches);
