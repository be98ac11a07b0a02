//! The client against the real qemu-nbd: contents, holes, allocation and dirty-bitmap
//! extents, errors a caller branches on, both transports, and reconnects.
//!
//! How dirty bits get recorded here: `qemu-img bitmap --add` creates a persistent, enabled
//! bitmap in the qcow2 file. QEMU loads persistent bitmaps whenever it opens a qcow2 image
//! read-write and writes them back on close (docs/interop/bitmaps.rst, "Bitmap
//! Persistence"), and this holds for qemu-io too: `qemu-io -c 'write ...' disk.qcow2` runs
//! the write through the block layer, which marks the enabled bitmap, and stores the bitmap
//! when qemu-io exits. No qemu-storage-daemon or QMP is needed. Bits are per granule (64 KiB
//! for a qcow2 with 64 KiB clusters), so a write marks every granule it touches.

mod common;

use std::time::{Duration, Instant};

use blockproof_nbd::{dirty_bitmap_context, ranges_where, Client, Error, Extent, BASE_ALLOCATION};
use common::{free_port, options, sparse_disk, Image, Listen, QemuNbd};

const K: usize = 1024;
const M: usize = 1024 * 1024;

fn unix_server(image: &Image, extra: &[&str]) -> QemuNbd {
    QemuNbd::start(image.path(), Listen::Unix(image.socket()), extra)
}

/// Reads the whole export in 64 KiB ranges through the pipelined iterator.
fn read_all(client: &mut Client) -> Vec<u8> {
    let size = client.size() as usize;
    let ranges = (0..size).step_by(64 * K).map(|o| (o as u64, (size - o).min(64 * K)));
    let mut out = Vec::with_capacity(size);
    for r in client.reads(ranges) {
        let (offset, data) = r.unwrap();
        assert_eq!(offset as usize, out.len(), "ranges come back in order");
        out.extend_from_slice(&data);
    }
    out
}

#[test]
fn reads_equal_qemu_img_convert_at_every_depth() {
    // Noise in aligned and unaligned places, an unwritten gap, and a region over 32 MiB
    // (the largest request qemu-nbd accepts) so whole-disk reads must be split.
    let regions = [(0, M), (3 * M + 512, 100 * K + 7), (8 * M - 4096, 8192), (20 * M, 3 * M), (39 * M, M)];
    let raw = sparse_disk(40 * M, &regions);
    let image = Image::from_raw(&raw);
    let converted = image.raw();
    assert!(converted == raw, "qemu-img round trip");
    let server = unix_server(&image, &[]);

    for depth in [1, 16] {
        let mut opts = options(&[]);
        opts.depth = depth;
        let mut client = Client::connect(&server.uri(""), opts).unwrap();
        assert_eq!(client.size(), 40 * M as u64);
        assert!(client.info().is_read_only() && client.info().structured_replies);
        assert!(read_all(&mut client) == converted, "depth {depth}: bytes differ from qemu-img convert");
        client.close().unwrap();
    }

    // One range of 40 MiB with unbounded request size: split at the server's maximum.
    let mut opts = options(&[]);
    opts.request_size = u32::MAX;
    let mut client = Client::connect(&server.uri(""), opts).unwrap();
    let max = client.info().block_size.expect("qemu-nbd advertises block sizes").maximum;
    assert!(max <= 32 * M as u32, "qemu-nbd's maximum is {max}");
    assert!(client.read_vec(0, 40 * M).unwrap() == converted);

    // Ranges in a scrambled order come back in that order, each with its own bytes.
    let mut ranges: Vec<(u64, usize)> = (0..40).map(|i| ((i * M + (i % 3) * 4096) as u64, 8192 + i * 512)).collect();
    ranges.reverse();
    ranges.swap(3, 17);
    let mut seen = Vec::new();
    client
        .read_batch(&ranges, |offset, data| {
            let o = offset as usize;
            assert!(data == converted[o..o + data.len()], "range at {offset}");
            seen.push((offset, data.len()));
        })
        .unwrap();
    assert_eq!(seen, ranges);
    // Zero-length ranges are allowed and cost nothing.
    let got: Vec<_> = client.reads([(5, 0), (0, 16), (7, 0)]).map(|r| r.unwrap()).collect();
    assert_eq!(got, vec![(5, vec![]), (0, converted[..16].to_vec()), (7, vec![])]);
}

#[test]
fn holes_read_as_zeros() {
    let image = Image::qcow2(16 * M as u64);
    image.io(&["write -P 0xab 0 64k", "write -P 0xcd 8M 64k"]);
    let server = unix_server(&image, &[]);
    let mut client = Client::connect(&server.uri(""), options(&[])).unwrap();
    let mut buf = vec![0xffu8; 4 * M];
    client.read_at(&mut buf, 2 * M as u64).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "an unallocated region reads as zeroes");
    // Across data/hole boundaries.
    let data = client.read_vec(32 * K as u64, 64 * K).unwrap();
    assert!(data[..32 * K].iter().all(|&b| b == 0xab) && data[32 * K..].iter().all(|&b| b == 0));
    let data = client.read_vec((8 * M - 4 * K) as u64, 8 * K).unwrap();
    assert!(data[..4 * K].iter().all(|&b| b == 0) && data[4 * K..].iter().all(|&b| b == 0xcd));
}

#[test]
fn base_allocation_extents_match_the_writes() {
    let image = Image::qcow2(8 * M as u64);
    let writes = [(0, 64 * K), (M, 64 * K), (3 * M + 4 * K, 4 * K), (5 * M, 200 * K)];
    let cmds: Vec<String> = writes.iter().map(|(o, l)| format!("write -P 0x5a {o} {l}")).collect();
    image.io(&cmds.iter().map(String::as_str).collect::<Vec<_>>());
    let server = unix_server(&image, &[]);
    let mut client = Client::connect(&server.uri(""), options(&[BASE_ALLOCATION.into()])).unwrap();
    let extents = client.extents(BASE_ALLOCATION, 0, client.size()).unwrap();
    check_tiling(&extents, 0, 8 * M as u64);

    // Every written byte is in an extent that may hold data (ZERO clear)...
    let data = ranges_where(&extents, |e| !e.is_zero());
    for &(o, l) in &writes {
        assert!(data.iter().any(|&(d, dl)| d <= o as u64 && (o + l) as u64 <= d + dl), "write {o}+{l} not in {data:?}");
    }
    // ...and nothing outside the 64 KiB clusters the writes touched is allocated or
    // non-zero. (Inside a cluster the host file system decides what is a hole.)
    let clusters = cluster_ranges(&writes, 64 * K);
    for e in &extents {
        if !clusters.iter().any(|&(c, cl)| c <= e.offset && e.end() <= c + cl) {
            assert!(e.is_hole() && e.is_zero(), "unwritten extent {e:?} should be a zero hole");
        }
    }
    // A sub-range is described exactly, starting where asked.
    let part = client.extents(BASE_ALLOCATION, 3 * M as u64, 512 * K as u64).unwrap();
    check_tiling(&part, 3 * M as u64, 512 * K as u64);
}

#[test]
fn extents_of_a_disk_larger_than_one_request() {
    // 5 GiB, sparse: block status goes out in 1 GiB requests and the answers are joined.
    let image = Image::qcow2(5 << 30);
    image.io(&["write -P 1 0 64k", "write -P 2 4608M 128k"]);
    let server = unix_server(&image, &[]);
    let mut client = Client::connect(&server.uri(""), options(&[BASE_ALLOCATION.into()])).unwrap();
    let extents = client.extents(BASE_ALLOCATION, 0, client.size()).unwrap();
    check_tiling(&extents, 0, 5 << 30);
    let data = ranges_where(&extents, |e| !e.is_zero());
    assert_eq!(data, vec![(0, 64 * K as u64), (4608 << 20, 128 * K as u64)]);
    // The zero stretch between them crosses four request boundaries yet is one extent.
    assert_eq!(extents.len(), 4, "{extents:?}");
}

#[test]
fn dirty_bitmap_extents_match_the_writes_after_the_bitmap() {
    let image = Image::qcow2(8 * M as u64);
    image.io(&["write -P 0x11 0 64k", "write -P 0x11 6M 1M"]); // before: not dirty
    image.add_bitmap("b0");
    let after = [(M, 64 * K), (3 * M + 4 * K, 4 * K), (5 * M + 10 * K, 200 * K), (7 * M + 64 * K, 1)];
    let cmds: Vec<String> = after.iter().map(|(o, l)| format!("write -P 0x22 {o} {l}")).collect();
    image.io(&cmds.iter().map(String::as_str).collect::<Vec<_>>());

    let server = unix_server(&image, &["-B", "b0"]);
    let bitmap = dirty_bitmap_context("b0");
    let mut client = Client::connect(&server.uri(""), options(&[BASE_ALLOCATION.into(), bitmap.clone()])).unwrap();
    let extents = client.extents(&bitmap, 0, client.size()).unwrap();
    check_tiling(&extents, 0, 8 * M as u64);
    let dirty = ranges_where(&extents, Extent::is_dirty);
    assert_eq!(dirty, cluster_ranges(&after, 64 * K), "dirty granules are exactly those written after --add");
    // Both contexts answer every request; each is kept apart.
    let alloc = client.extents(BASE_ALLOCATION, 0, client.size()).unwrap();
    assert!(ranges_where(&alloc, |e| !e.is_zero()).iter().any(|&(o, _)| o == 6 * M as u64));
}

#[test]
fn a_missing_bitmap_is_a_distinct_error() {
    let image = Image::qcow2(M as u64);
    image.add_bitmap("b0");
    let server = unix_server(&image, &["-B", "b0"]);
    match Client::connect(&server.uri(""), options(&[dirty_bitmap_context("nope")])) {
        Err(Error::BitmapNotFound { bitmap, .. }) => assert_eq!(bitmap, "nope"),
        other => panic!("expected BitmapNotFound, got {other:?}"),
    }
    // Exported without -B: the bitmap exists in the image but not on the wire.
    drop(server);
    let server = unix_server(&image, &[]);
    let e = Client::connect(&server.uri(""), options(&[dirty_bitmap_context("b0")])).unwrap_err();
    assert!(matches!(e, Error::BitmapNotFound { .. }), "{e}");
    // Block status without any negotiated context is refused locally.
    let mut client = Client::connect(&server.uri(""), options(&[])).unwrap();
    assert!(matches!(client.extents(BASE_ALLOCATION, 0, 4096), Err(Error::UnknownContext { .. })));
    assert!(matches!(client.block_status(0, 4096), Err(Error::UnknownContext { .. })));
}

#[test]
fn tcp_on_a_free_port_with_a_named_export() {
    let raw = sparse_disk(4 * M, &[(0, M + 3)]);
    let image = Image::from_raw(&raw);
    let port = free_port();
    let server = QemuNbd::start(image.path(), Listen::Tcp(port), &["-x", "disk0"]);
    let uri: blockproof_nbd::Uri = format!("nbd://127.0.0.1:{port}/disk0").parse().unwrap();
    assert_eq!(uri, server.uri("disk0"));
    let mut client = Client::connect(&uri, options(&[BASE_ALLOCATION.into()])).unwrap();
    assert!(read_all(&mut client) == raw);
    assert!(!client.extents(BASE_ALLOCATION, 0, client.size()).unwrap().is_empty());
    client.close().unwrap();

    match Client::connect(&server.uri("other"), options(&[])) {
        Err(Error::ExportNotFound { export, .. }) => assert_eq!(export, "other"),
        other => panic!("expected ExportNotFound, got {other:?}"),
    }
}

#[test]
fn caller_errors_are_refused_before_sending() {
    let image = Image::qcow2(M as u64);
    let server = unix_server(&image, &[]);
    let mut client = Client::connect(&server.uri(""), options(&[])).unwrap();
    assert!(matches!(client.read_vec(M as u64 - 10, 11), Err(Error::OutOfRange { .. })));
    assert!(matches!(client.read_vec(u64::MAX, 1), Err(Error::OutOfRange { .. })));
    // The connection is still good afterwards.
    assert_eq!(client.read_vec(0, 10).unwrap(), vec![0; 10]);
    let missing = blockproof_nbd::Uri::unix(image.dir.path().join("none.sock"), "");
    assert!(matches!(Client::connect(&missing, options(&[])), Err(Error::Connect { .. })));
}

#[test]
fn a_restarted_server_is_reconnected_and_reads_resume() {
    let raw = sparse_disk(32 * M, &[(0, 32 * M)]);
    let image = Image::from_raw(&raw);
    let mut server = unix_server(&image, &[]);
    let mut opts = options(&[BASE_ALLOCATION.into()]);
    opts.retry.attempts = 8;
    let mut client = Client::connect(&server.uri(""), opts).unwrap();

    let ranges = (0..32 * M).step_by(256 * K).map(|o| (o as u64, 256 * K));
    let mut out = Vec::new();
    let mut restarter = None;
    for (i, r) in client.reads(ranges).enumerate() {
        let (_, data) = r.unwrap();
        out.extend_from_slice(&data);
        if i == 20 {
            // Mid-stream, with requests in flight: kill -9, and bring it back in 150 ms.
            server.kill();
            restarter = Some(server.restart_later(Duration::from_millis(150)));
        }
    }
    let _server = restarter.unwrap().join();
    assert!(out == raw, "bytes after the reconnect differ");
    assert!(client.reconnects() >= 1);
    // Block status works on the new connection (its context ids were renegotiated).
    assert!(!client.extents(BASE_ALLOCATION, 0, M as u64).unwrap().is_empty());
}

#[test]
fn a_server_gone_for_good_is_reported_after_bounded_retries() {
    let raw = sparse_disk(16 * M, &[(0, 16 * M)]);
    let image = Image::from_raw(&raw);
    let mut server = unix_server(&image, &[]);
    let mut client = Client::connect(&server.uri(""), options(&[])).unwrap();
    let mut err = None;
    let start = Instant::now();
    for (i, r) in client.reads((0..16 * M).step_by(64 * K).map(|o| (o as u64, 64 * K))).enumerate() {
        match r {
            Ok(_) if i == 10 => server.kill(),
            Ok(_) => {}
            Err(e) => err = Some(e),
        }
    }
    match err {
        Some(Error::ConnectionLost { offset, attempts, .. }) => {
            assert!(offset >= 11 * 64 * K as u64 && offset % (64 * K) as u64 == 0, "offset {offset}");
            assert_eq!(attempts, 5);
        }
        other => panic!("expected ConnectionLost, got {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(5), "retries are bounded: {:?}", start.elapsed());
    // A new operation tries again, and fails the same clear way.
    let e = client.read_vec(0, 4096).unwrap_err();
    assert!(e.to_string().contains("offset 0"), "{e}");
}

#[test]
fn injected_read_errors_transient_survived_persistent_named() {
    let raw = sparse_disk(4 * M, &[(0, 4 * M)]);
    let image = Image::from_raw(&raw);
    for (once, expect_ok) in [("on", true), ("off", false)] {
        let config = image.dir.path().join(format!("blkdebug-{once}.cfg"));
        let rule = format!("[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\nonce = \"{once}\"\n");
        std::fs::write(&config, rule).unwrap();
        let spec = format!(
            "driver=qcow2,file.driver=blkdebug,file.config={},file.image.filename={}",
            config.display(),
            image.path()
        );
        let server = QemuNbd::start_image_opts(&spec, Listen::Unix(image.socket()));
        let mut client = Client::connect(&server.uri(""), options(&[])).unwrap();
        let result = client.read_vec(M as u64, 2 * M);
        if expect_ok {
            // qemu-nbd drops the client on the EIO; the reconnect re-sends the read.
            assert!(result.unwrap() == raw[M..3 * M]);
        } else {
            let e = result.unwrap_err();
            match &e {
                Error::ConnectionLost { offset, .. } | Error::Server { offset, .. } => {
                    assert_eq!(*offset, M as u64, "{e}")
                }
                other => panic!("expected a lost request naming its offset, got {other:?}"),
            }
            assert!(e.to_string().contains(&format!("offset {M}")), "{e}");
        }
    }
}

/// Extents start at `offset`, touch, and end exactly at `offset + len`.
fn check_tiling(extents: &[Extent], offset: u64, len: u64) {
    let mut pos = offset;
    for e in extents {
        assert_eq!(e.offset, pos, "{extents:?}");
        assert!(e.length > 0);
        pos = e.end();
    }
    assert_eq!(pos, offset + len);
}

/// The `granule`-aligned ranges touched by `writes`, merged.
fn cluster_ranges(writes: &[(usize, usize)], granule: usize) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut sorted = writes.to_vec();
    sorted.sort();
    for (o, l) in sorted {
        let start = (o / granule * granule) as u64;
        let end = (o + l).div_ceil(granule) as u64 * granule as u64;
        match out.last_mut() {
            Some((s, len)) if *s + *len >= start => *len = (*len).max(end - *s),
            _ => out.push((start, end - start)),
        }
    }
    out
}
