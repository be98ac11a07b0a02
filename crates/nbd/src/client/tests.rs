//! The client against a scripted in-process server: behaviour qemu-nbd does not show on
//! demand (replies out of order with interleaved chunks, short block status answers,
//! simple replies only, protocol violations, error chunks, a resized export).

use super::*;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use crate::error::ProtocolError;
use crate::extent::STATE_HOLE;

/// A request as the server sees it.
#[derive(Debug, Clone, Copy)]
struct Req {
    kind: u16,
    cookie: u64,
    offset: u64,
    len: u32,
}

/// What the server does with a batch of requests: bytes to send, and whether to hang up.
struct Answer {
    bytes: Vec<u8>,
    close: bool,
}

type Handler = Box<dyn FnMut(usize, &[Req]) -> Answer + Send>;

struct Setup {
    sizes: Vec<u64>,
    structured: bool,
}

/// Serves connections one after another; connection `n` announces `sizes[n]` (or the last).
fn serve(setup: Setup, mut handler: Handler) -> (tempfile::TempDir, Uri) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            let Ok(mut s) = stream else { return };
            let size = *setup.sizes.get(n).or(setup.sizes.last()).unwrap();
            if handshake(&mut s, size, setup.structured).is_err() {
                continue;
            }
            while let Some(batch) = read_batch(&mut s) {
                if batch.iter().any(|r| r.kind == 2) {
                    break; // NBD_CMD_DISC
                }
                let answer = handler(n, &batch);
                if s.write_all(&answer.bytes).is_err() || answer.close {
                    break;
                }
            }
        }
    });
    (dir, Uri::unix(path, "e"))
}

fn handshake(s: &mut UnixStream, size: u64, structured: bool) -> std::io::Result<()> {
    let mut out = 0x4e42_444d_4147_4943u64.to_be_bytes().to_vec();
    out.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
    out.extend_from_slice(&3u16.to_be_bytes());
    s.write_all(&out)?;
    let mut cflags = [0u8; 4];
    s.read_exact(&mut cflags)?;
    loop {
        let mut head = [0u8; 16];
        s.read_exact(&mut head)?;
        let opt = u32::from_be_bytes(head[8..12].try_into().unwrap());
        let mut data = vec![0u8; u32::from_be_bytes(head[12..16].try_into().unwrap()) as usize];
        s.read_exact(&mut data)?;
        let reply = |s: &mut UnixStream, kind: u32, payload: &[u8]| {
            let mut r = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
            r.extend_from_slice(&opt.to_be_bytes());
            r.extend_from_slice(&kind.to_be_bytes());
            r.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            r.extend_from_slice(payload);
            s.write_all(&r)
        };
        match opt {
            8 if structured => reply(s, 1, &[])?,
            8 => reply(s, 0x8000_0001, &[])?,
            10 => {
                let mut ctx = 5u32.to_be_bytes().to_vec();
                ctx.extend_from_slice(b"base:allocation");
                reply(s, 4, &ctx)?;
                reply(s, 1, &[])?;
            }
            7 => {
                let mut info = 0u16.to_be_bytes().to_vec();
                info.extend_from_slice(&size.to_be_bytes());
                info.extend_from_slice(&3u16.to_be_bytes());
                reply(s, 3, &info)?;
                return reply(s, 1, &[]);
            }
            _ => reply(s, 0x8000_0001, &[])?,
        }
    }
}

/// Blocks for one request, then takes whatever else arrives within 30 ms.
fn read_batch(s: &mut UnixStream) -> Option<Vec<Req>> {
    let mut batch = Vec::new();
    s.set_read_timeout(None).ok()?;
    loop {
        let mut b = [0u8; 28];
        match s.read_exact(&mut b) {
            Ok(()) => batch.push(Req {
                kind: u16::from_be_bytes([b[6], b[7]]),
                cookie: u64::from_be_bytes(b[8..16].try_into().unwrap()),
                offset: u64::from_be_bytes(b[16..24].try_into().unwrap()),
                len: u32::from_be_bytes(b[24..28].try_into().unwrap()),
            }),
            Err(_) if !batch.is_empty() => return Some(batch),
            Err(_) => return None,
        }
        s.set_read_timeout(Some(Duration::from_millis(30))).ok()?;
    }
}

/// The export's content: byte at offset `o` is `o % 251`.
fn content(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| ((offset + i) % 251) as u8).collect()
}

fn chunk(out: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, payload: &[u8]) {
    out.extend_from_slice(&0x668e_33efu32.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

fn data(out: &mut Vec<u8>, flags: u16, cookie: u64, offset: u64, len: usize) {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(&content(offset, len));
    chunk(out, flags, 1, cookie, &p);
}

fn error_offset(out: &mut Vec<u8>, cookie: u64, errno: u32, offset: u64) {
    let mut p = errno.to_be_bytes().to_vec();
    p.extend_from_slice(&4u16.to_be_bytes());
    p.extend_from_slice(b"boom");
    p.extend_from_slice(&offset.to_be_bytes());
    chunk(out, 1, 0x8002, cookie, &p);
}

fn quick() -> ClientOptions {
    ClientOptions {
        retry: RetryPolicy {
            attempts: 3,
            initial_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(20),
        },
        io_timeout: Some(Duration::from_secs(10)),
        ..ClientOptions::default()
    }
}

/// Answers reads correctly: each in two data chunks and a NONE, the batch in reverse
/// order with the chunks of different requests interleaved.
fn reordering_reads() -> Handler {
    Box::new(|_, batch| {
        let mut out = Vec::new();
        let reads: Vec<_> = batch.iter().rev().filter(|r| r.kind == 0).collect();
        for r in &reads {
            let half = (r.len / 2) as usize;
            data(&mut out, 0, r.cookie, r.offset + half as u64, r.len as usize - half);
        }
        for r in &reads {
            let half = (r.len / 2) as usize;
            if half > 0 {
                data(&mut out, 0, r.cookie, r.offset, half);
            }
            chunk(&mut out, 1, 0, r.cookie, &[]);
        }
        Answer { bytes: out, close: false }
    })
}

#[test]
fn replies_out_of_order_with_interleaved_chunks() {
    let (_dir, uri) = serve(Setup { sizes: vec![1 << 20], structured: true }, reordering_reads());
    let mut opts = quick();
    opts.request_size = 8192;
    let mut c = Client::connect(&uri, opts).unwrap();
    // Small contiguous ranges (coalesced), a gap, and a range split over several requests.
    let ranges: Vec<(u64, usize)> = vec![(0, 1000), (1000, 3000), (4000, 5), (10_000, 50_000), (70_000, 1)];
    let got: Vec<_> = c.reads(ranges.clone()).map(|r| r.unwrap()).collect();
    let want: Vec<_> = ranges.iter().map(|&(o, l)| (o, content(o, l))).collect();
    assert_eq!(got, want);
    assert_eq!(c.read_vec(123_456, 100_000).unwrap(), content(123_456, 100_000));
    c.close().unwrap();
}

#[test]
fn simple_replies_when_structured_replies_are_refused() {
    let handler: Handler = Box::new(|_, batch| {
        let mut out = Vec::new();
        for r in batch {
            out.extend_from_slice(&0x6744_6698u32.to_be_bytes());
            out.extend_from_slice(&0u32.to_be_bytes());
            out.extend_from_slice(&r.cookie.to_be_bytes());
            out.extend_from_slice(&content(r.offset, r.len as usize));
        }
        Answer { bytes: out, close: false }
    });
    let (_dir, uri) = serve(Setup { sizes: vec![1 << 20], structured: false }, handler);
    let mut c = Client::connect(&uri, quick()).unwrap();
    assert!(!c.info().structured_replies);
    assert_eq!(c.read_vec(777, 300_000).unwrap(), content(777, 300_000));
    c.close().unwrap(); // the scripted server takes one connection at a time
    let e = Client::connect(&uri, ClientOptions { contexts: vec![BASE_ALLOCATION_NAME.into()], ..quick() });
    assert!(matches!(e, Err(Error::MetaContextsUnsupported { .. })), "{e:?}");
}

const BASE_ALLOCATION_NAME: &str = crate::extent::BASE_ALLOCATION;

#[test]
fn short_block_status_answers_are_followed_up() {
    // One extent of at most 4 KiB per answer, flags alternating by 4 KiB block; the last
    // block's extent runs past the request (allowed: the client clips it).
    let handler: Handler = Box::new(|_, batch| {
        let mut out = Vec::new();
        for r in batch.iter().filter(|r| r.kind == 7) {
            let block = r.offset / 4096;
            let len = (4096 - r.offset % 4096) as u32;
            let mut p = 5u32.to_be_bytes().to_vec();
            p.extend_from_slice(&len.to_be_bytes());
            p.extend_from_slice(&((block % 2) as u32 * STATE_HOLE).to_be_bytes());
            chunk(&mut out, 1, 5, r.cookie, &p);
        }
        Answer { bytes: out, close: false }
    });
    let (_dir, uri) = serve(Setup { sizes: vec![1 << 20], structured: true }, handler);
    let mut c =
        Client::connect(&uri, ClientOptions { contexts: vec![BASE_ALLOCATION_NAME.into()], ..quick() }).unwrap();
    let ext = c.extents(BASE_ALLOCATION_NAME, 1000, 5 * 4096).unwrap();
    let e = |offset, length, flags| Extent { offset, length, flags };
    assert_eq!(
        ext,
        vec![
            e(1000, 3096, 0),
            e(4096, 4096, 1),
            e(8192, 4096, 0),
            e(12288, 4096, 1),
            e(16384, 4096, 0),
            e(20480, 1000, 1)
        ]
    );
    let one = c.block_status(0, 100).unwrap();
    assert_eq!(one.extents(5), Some(&[e(0, 100, 0)][..]));
}

#[test]
fn a_protocol_violation_drops_the_connection_and_the_next_read_reconnects() {
    let handler: Handler = Box::new(|n, batch| {
        let mut out = Vec::new();
        for r in batch {
            if n == 0 {
                // Data for bytes outside the request.
                data(&mut out, 1, r.cookie, r.offset + u64::from(r.len), 16);
            } else {
                data(&mut out, 1, r.cookie, r.offset, r.len as usize);
            }
        }
        Answer { bytes: out, close: false }
    });
    let (_dir, uri) = serve(Setup { sizes: vec![1 << 20], structured: true }, handler);
    let mut c = Client::connect(&uri, quick()).unwrap();
    match c.read_vec(0, 4096) {
        Err(Error::Protocol { source: ProtocolError::OutsideRequest { .. }, .. }) => {}
        other => panic!("expected a protocol error, got {other:?}"),
    }
    assert_eq!(c.read_vec(4096, 4096).unwrap(), content(4096, 4096));
    assert_eq!(c.reconnects(), 1);
}

#[test]
fn eio_is_retried_and_other_errors_are_reported_at_once() {
    let mut seen_eio = false;
    let handler: Handler = Box::new(move |_, batch| {
        let mut out = Vec::new();
        for r in batch {
            if r.offset == 0 && !seen_eio {
                seen_eio = true;
                error_offset(&mut out, r.cookie, 5, r.offset + 10);
            } else if r.offset == 8192 {
                error_offset(&mut out, r.cookie, 22, r.offset + 100);
            } else if r.offset == 16384 {
                error_offset(&mut out, r.cookie, 5, r.offset + 7);
            } else {
                data(&mut out, 1, r.cookie, r.offset, r.len as usize);
            }
        }
        Answer { bytes: out, close: false }
    });
    let (_dir, uri) = serve(Setup { sizes: vec![1 << 20], structured: true }, handler);
    let mut c = Client::connect(&uri, quick()).unwrap();
    assert_eq!(c.read_vec(0, 4096).unwrap(), content(0, 4096), "one EIO, then success");
    match c.read_vec(8192, 4096) {
        Err(Error::Server { errno: 22, offset: 8292, message, .. }) => assert_eq!(message, "boom"),
        other => panic!("EINVAL is not retried: {other:?}"),
    }
    match c.read_vec(16384, 4096) {
        Err(e @ Error::Server { errno: 5, offset: 16391, .. }) => assert!(e.to_string().contains("EIO")),
        other => panic!("persistent EIO: {other:?}"),
    }
    // Still usable.
    assert_eq!(c.read_vec(4096, 10).unwrap(), content(4096, 10));
}

#[test]
fn a_resized_export_is_refused_on_reconnect() {
    let handler: Handler = Box::new(|n, batch| {
        let mut out = Vec::new();
        for r in batch {
            data(&mut out, 1, r.cookie, r.offset, r.len as usize);
        }
        // The first connection hangs up after its first answer.
        Answer { bytes: if n == 0 { Vec::new() } else { out }, close: n == 0 }
    });
    let (_dir, uri) = serve(Setup { sizes: vec![1 << 20, 2 << 20], structured: true }, handler);
    let mut c = Client::connect(&uri, quick()).unwrap();
    match c.read_vec(0, 4096) {
        Err(Error::ExportResized { was, now, .. }) => assert_eq!((was, now), (1 << 20, 2 << 20)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn reads_can_be_abandoned_midway() {
    let (_dir, uri) = serve(Setup { sizes: vec![1 << 20], structured: true }, reordering_reads());
    let mut c = Client::connect(&uri, ClientOptions { depth: 4, request_size: 4096, ..quick() }).unwrap();
    {
        let mut it = c.reads((0..64).map(|i| (i * 8192, 8192)));
        assert_eq!(it.next().unwrap().unwrap(), (0, content(0, 8192)));
    } // dropped with requests in flight: their replies are drained
    assert_eq!(c.read_vec(500_000, 9000).unwrap(), content(500_000, 9000));
    assert_eq!(c.reconnects(), 0);
}

#[test]
fn retry_delays_grow_and_are_bounded() {
    let p = RetryPolicy { attempts: 9, initial_delay: Duration::from_millis(100), max_delay: Duration::from_secs(1) };
    let d: Vec<_> = (1..=6).map(|n| p.delay(n).as_millis()).collect();
    assert_eq!(d, vec![100, 200, 400, 800, 1000, 1000]);
    assert_eq!(p.delay(200), Duration::from_secs(1));
    assert_eq!(RetryPolicy::none().attempts, 0);
}
