//! The server byte by byte (scripted client input, parsed replies), against this crate's own
//! client over a unix socket, and against random input. Real clients (qemu-img, qemu-io,
//! nbdinfo, nbdcopy) are tested by the binary's `serve` tests.

use super::*;
use std::os::unix::net::UnixListener;

use crate::{Client, ClientOptions, Error, Uri};

const BLOCK: u64 = 65536;

/// A disk whose even 64 KiB blocks are zero (and reported as such), the odd ones a pattern.
struct Mem(u64);

fn byte_at(pos: u64) -> u8 {
    if (pos / BLOCK).is_multiple_of(2) {
        0
    } else {
        (pos % 251) as u8 | 1
    }
}

impl Export for Mem {
    fn size(&self) -> u64 {
        self.0
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        for (k, b) in buf.iter_mut().enumerate() {
            *b = byte_at(offset + k as u64);
        }
        Ok(())
    }
    fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, bool)>> {
        let mut out: Vec<(u64, bool)> = Vec::new();
        let (mut at, end) = (offset, offset + len);
        while at < end {
            let next = ((at / BLOCK + 1) * BLOCK).min(end);
            let zero = (at / BLOCK).is_multiple_of(2);
            match out.last_mut() {
                Some((l, z)) if *z == zero => *l += next - at,
                _ => out.push((next - at, zero)),
            }
            at = next;
        }
        Ok(out)
    }
}

/// A client's bytes in, the server's bytes out.
struct Duplex(io::Cursor<Vec<u8>>, Vec<u8>);

impl Read for Duplex {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        self.0.read(b)
    }
}

impl Write for Duplex {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.1.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn exports() -> Exports<'static> {
    vec![("d".into(), Arc::new(Mem(1 << 20)))]
}

fn session(input: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
    let exports = exports();
    let mut d = Duplex(io::Cursor::new(input), Vec::new());
    let r = serve(&mut d, &exports);
    (r, d.1)
}

fn option(code: u32, data: &[u8]) -> Vec<u8> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&code.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn request(kind: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut v = REQUEST_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&0u16.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

/// Client flags (fixed newstyle, no zeroes), then `NBD_OPT_EXPORT_NAME d`, optionally after
/// `NBD_OPT_STRUCTURED_REPLY`. Returns the input and the length of the server's handshake.
fn start(structured: bool) -> (Vec<u8>, usize) {
    let mut input = 3u32.to_be_bytes().to_vec();
    let mut handshake = 18 + 10;
    if structured {
        input.extend(option(OPT_STRUCTURED_REPLY, b""));
        handshake += 20;
    }
    input.extend(option(OPT_EXPORT_NAME, b"d"));
    (input, handshake)
}

/// One transmission reply, parsed.
#[derive(Debug, PartialEq, Eq)]
enum Msg {
    Simple { cookie: u64, error: u32, data: usize },
    Chunk { cookie: u64, done: bool, kind: u16, payload: Vec<u8> },
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// Parses replies; `read_len` gives the data length following a successful simple reply.
fn replies(mut out: &[u8], read_len: impl Fn(u64) -> usize) -> Vec<Msg> {
    let mut msgs = Vec::new();
    while !out.is_empty() {
        match be32(out) {
            SIMPLE_REPLY_MAGIC => {
                let (error, cookie) = (be32(&out[4..]), be64(&out[8..]));
                let data = if error == 0 { read_len(cookie) } else { 0 };
                msgs.push(Msg::Simple { cookie, error, data });
                out = &out[16 + data..];
            }
            STRUCTURED_REPLY_MAGIC => {
                let flags = u16::from_be_bytes([out[4], out[5]]);
                let kind = u16::from_be_bytes([out[6], out[7]]);
                let (cookie, len) = (be64(&out[8..]), be32(&out[16..]) as usize);
                let payload = out[20..20 + len].to_vec();
                msgs.push(Msg::Chunk { cookie, done: flags & FLAG_DONE != 0, kind, payload });
                out = &out[20 + len..];
            }
            m => panic!("bad reply magic {m:#x}"),
        }
    }
    msgs
}

#[test]
fn export_name_then_read_and_disconnect() {
    let (mut input, hs) = start(false);
    input.extend(request(CMD_READ, 7, BLOCK + 10, 20));
    input.extend(request(CMD_DISC, 8, 0, 0));
    let (r, out) = session(input);
    r.unwrap();
    assert_eq!(replies(&out[hs..], |_| 20), vec![Msg::Simple { cookie: 7, error: 0, data: 20 }]);
    assert_eq!(out[hs + 16], byte_at(BLOCK + 10));
}

#[test]
fn structured_reads_send_zero_blocks_as_holes() {
    let (mut input, hs) = start(true);
    // Half a zero block, a data block, half a zero block.
    input.extend(request(CMD_READ, 1, BLOCK / 2, 2 * BLOCK as u32));
    let (r, out) = session(input);
    r.unwrap();
    let msgs = replies(&out[hs..], |_| unreachable!());
    let kinds: Vec<(u16, bool)> = msgs
        .iter()
        .map(|m| match m {
            Msg::Chunk { kind, done, .. } => (*kind, *done),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(kinds, vec![(TYPE_OFFSET_HOLE, false), (TYPE_OFFSET_DATA, false), (TYPE_OFFSET_HOLE, true)]);
    let Msg::Chunk { payload, .. } = &msgs[0] else { unreachable!() };
    assert_eq!((be64(payload), be32(&payload[8..])), (BLOCK / 2, (BLOCK / 2) as u32));
    let Msg::Chunk { payload, .. } = &msgs[1] else { unreachable!() };
    assert_eq!((be64(payload), payload.len() as u64 - 8), (BLOCK, BLOCK));
}

#[test]
fn writes_are_refused_and_their_data_skipped() {
    let (mut input, hs) = start(true);
    input.extend(request(CMD_WRITE, 1, 0, 4096));
    input.extend(vec![0xaa; 4096]);
    input.extend(request(CMD_TRIM, 2, 0, 4096));
    input.extend(request(CMD_WRITE_ZEROES, 3, 0, 4096));
    input.extend(request(99, 4, 0, 0));
    // The session goes on: this read is answered.
    input.extend(request(CMD_READ, 5, BLOCK, 8));
    input.extend(request(CMD_DISC, 6, 0, 0));
    let (r, out) = session(input);
    r.unwrap();
    let msgs = replies(&out[hs..], |_| unreachable!());
    let errno = |m: &Msg| match m {
        Msg::Chunk { kind: TYPE_ERROR, payload, done: true, .. } => be32(payload),
        other => panic!("{other:?}"),
    };
    assert_eq!(msgs[..4].iter().map(errno).collect::<Vec<_>>(), vec![EPERM, EPERM, EPERM, EINVAL]);
    assert!(matches!(&msgs[4], Msg::Chunk { cookie: 5, kind: TYPE_OFFSET_DATA, done: true, .. }));
    // Without structured replies, simple error replies.
    let (mut input, hs) = start(false);
    input.extend(request(CMD_WRITE, 1, 0, 512));
    input.extend(vec![0; 512]);
    let (r, out) = session(input);
    r.unwrap();
    assert_eq!(replies(&out[hs..], |_| 0), vec![Msg::Simple { cookie: 1, error: EPERM, data: 0 }]);
}

#[test]
fn bad_ranges_are_einval() {
    let (mut input, hs) = start(false);
    input.extend(request(CMD_READ, 1, (1 << 20) - 4, 8));
    input.extend(request(CMD_READ, 2, u64::MAX - 2, 8));
    input.extend(request(CMD_READ, 3, 0, MAX_REQUEST + 1));
    input.extend(request(CMD_BLOCK_STATUS, 4, 0, 4096)); // no context negotiated
    let (r, out) = session(input);
    r.unwrap();
    let errors: Vec<_> = replies(&out[hs..], |_| 0)
        .into_iter()
        .map(|m| match m {
            Msg::Simple { error, .. } => error,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(errors, vec![EINVAL; 4]);
}

#[test]
fn oversized_writes_drop_the_client() {
    let (mut input, _) = start(false);
    input.extend(request(CMD_WRITE, 1, 0, MAX_REQUEST + 1));
    assert!(session(input).0.is_err());
    // A write whose data never comes.
    let (mut input, _) = start(false);
    input.extend(request(CMD_WRITE, 1, 0, 4096));
    input.extend(vec![0; 100]);
    assert!(session(input).0.is_err());
}

#[test]
fn meta_context_needs_structured_replies_and_a_known_export() {
    let query = |export: &str| {
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
        d.extend_from_slice(BASE_ALLOCATION.as_bytes());
        d
    };
    let mut input = 3u32.to_be_bytes().to_vec();
    input.extend(option(OPT_SET_META_CONTEXT, &query("d")));
    input.extend(option(OPT_STRUCTURED_REPLY, b"x"));
    input.extend(option(OPT_STRUCTURED_REPLY, b""));
    input.extend(option(OPT_SET_META_CONTEXT, &query("nope")));
    input.extend(option(OPT_SET_META_CONTEXT, &query("d")));
    input.extend(option(OPT_ABORT, b""));
    let (r, out) = session(input);
    r.unwrap();
    let mut kinds = Vec::new();
    let mut at = 18;
    while at < out.len() {
        kinds.push(be32(&out[at + 12..]));
        at += 20 + be32(&out[at + 16..]) as usize;
    }
    assert_eq!(
        kinds,
        vec![REP_ERR_INVALID, REP_ERR_INVALID, REP_ACK, REP_ERR_UNKNOWN, REP_META_CONTEXT, REP_ACK, REP_ACK]
    );
}

#[test]
fn unknown_export_and_bad_magic_are_errors_not_panics() {
    let mut input = 3u32.to_be_bytes().to_vec();
    input.extend(option(OPT_EXPORT_NAME, b"nope"));
    assert!(session(input).0.is_err());
    let mut input = 3u32.to_be_bytes().to_vec();
    input.extend_from_slice(&[0xff; 16]);
    assert!(session(input).0.is_err());
    let (mut input, _) = start(true);
    input.extend_from_slice(&[0xff; 28]);
    assert!(session(input).0.is_err());
}

#[test]
fn random_client_input_never_panics() {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for round in 0..3000 {
        let mut input = 3u32.to_be_bytes().to_vec();
        // Half the rounds start with a valid option, then garbage.
        if round % 2 == 0 {
            input.extend(option([OPT_GO, OPT_STRUCTURED_REPLY, OPT_LIST, OPT_SET_META_CONTEXT][round % 4], b""));
        }
        // A quarter go on into transmission and send requests with random fields.
        if round % 4 == 1 {
            input = start(round % 8 == 1).0;
            for _ in 0..4 {
                let kind = (next() % 9) as u16;
                input.extend(request(kind, next(), next() % (2 << 20), (next() % (1 << 18)) as u32));
            }
        }
        let n = (next() % 96) as usize;
        input.extend((0..n).map(|_| next() as u8));
        let _ = session(input);
    }
}

/// This crate's client against the server: the handshake with `NBD_OPT_GO`, pipelined
/// reads, holes, `base:allocation`, and an unknown export.
#[test]
fn the_crate_client_reads_what_the_server_exports() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        let exports = exports();
        for _ in 0..2 {
            let (mut stream, _) = listener.accept().unwrap();
            let _ = serve(&mut stream, &exports);
        }
    });
    let options = ClientOptions { contexts: vec![BASE_ALLOCATION.into()], ..ClientOptions::default() };
    let mut client = Client::connect(&Uri::unix(path.clone(), "d"), options.clone()).unwrap();
    assert!(client.info().is_read_only());
    assert_eq!(client.size(), 1 << 20);
    let ranges: Vec<(u64, usize)> = (0..16).map(|k| (k * BLOCK - k.min(1) * 100, BLOCK as usize)).collect();
    for r in client.reads(ranges) {
        let (offset, data) = r.unwrap();
        assert!(data.iter().enumerate().all(|(k, b)| *b == byte_at(offset + k as u64)), "at {offset}");
    }
    let extents = client.extents(BASE_ALLOCATION, 0, 1 << 20).unwrap();
    assert_eq!(extents.len(), 16);
    assert!(extents.iter().all(|e| e.length == BLOCK && e.is_hole() == (e.offset / BLOCK).is_multiple_of(2)));
    client.close().unwrap();
    let err = Client::connect(&Uri::unix(path, "nope"), ClientOptions::default()).err().unwrap();
    assert!(matches!(err, Error::ExportNotFound { .. }), "{err}");
    server.join().unwrap();
}
