//! Reply parser tests: valid chunk sequences, each class of malformed reply, and a
//! property-style loop over random and truncated byte strings that must never panic.

use super::*;
use std::collections::HashMap;
use std::io::Cursor;

struct Table(HashMap<u64, (Pending, Vec<u8>)>);

impl Inflight for Table {
    fn pending(&mut self, cookie: u64) -> Option<&mut Pending> {
        self.0.get_mut(&cookie).map(|(p, _)| p)
    }

    // Hands out the space in pieces of at most 100 bytes, to exercise scattering.
    fn fill(
        &mut self,
        cookie: u64,
        at: usize,
        len: usize,
        f: &mut dyn FnMut(&mut [u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let buf = &mut self.0.get_mut(&cookie).expect("known cookie").1;
        for piece in buf[at..at + len].chunks_mut(100) {
            f(piece)?;
        }
        Ok(())
    }
}

impl Table {
    fn new() -> Table {
        let mut t = HashMap::new();
        t.insert(1, (Pending::read(4096, 1024), vec![0xee; 1024]));
        t.insert(2, (Pending::block_status(0, 8192, vec![10, 11]), Vec::new()));
        t.insert(3, (Pending::read(0, 16), vec![0xee; 16]));
        Table(t)
    }
}

#[derive(Default)]
struct Wire(Vec<u8>);

impl Wire {
    fn chunk(mut self, flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Self {
        self.0.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        self.0.extend_from_slice(&flags.to_be_bytes());
        self.0.extend_from_slice(&kind.to_be_bytes());
        self.0.extend_from_slice(&cookie.to_be_bytes());
        self.0.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        self.0.extend_from_slice(payload);
        self
    }
    fn data(self, flags: u16, cookie: u64, offset: u64, bytes: &[u8]) -> Self {
        let mut p = offset.to_be_bytes().to_vec();
        p.extend_from_slice(bytes);
        self.chunk(flags, TYPE_OFFSET_DATA, cookie, &p)
    }
    fn hole(self, flags: u16, cookie: u64, offset: u64, len: u32) -> Self {
        let mut p = offset.to_be_bytes().to_vec();
        p.extend_from_slice(&len.to_be_bytes());
        self.chunk(flags, TYPE_OFFSET_HOLE, cookie, &p)
    }
    fn status(self, flags: u16, cookie: u64, ctx: u32, extents: &[(u32, u32)]) -> Self {
        let mut p = ctx.to_be_bytes().to_vec();
        for (len, fl) in extents {
            p.extend_from_slice(&len.to_be_bytes());
            p.extend_from_slice(&fl.to_be_bytes());
        }
        self.chunk(flags, TYPE_BLOCK_STATUS, cookie, &p)
    }
    fn error(self, flags: u16, cookie: u64, errno: u32, msg: &str, offset: Option<u64>) -> Self {
        let mut p = errno.to_be_bytes().to_vec();
        p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        p.extend_from_slice(msg.as_bytes());
        let kind = match offset {
            Some(o) => {
                p.extend_from_slice(&o.to_be_bytes());
                TYPE_ERROR_OFFSET
            }
            None => TYPE_ERROR,
        };
        self.chunk(flags, kind, cookie, &p)
    }
    fn none(self, cookie: u64) -> Self {
        self.chunk(FLAG_DONE, TYPE_NONE, cookie, &[])
    }
}

/// Applies every message of `wire`; returns the last result.
fn run(wire: Wire, structured: bool, t: &mut Table) -> Result<Received, ReplyError> {
    let len = wire.0.len() as u64;
    let mut c = Cursor::new(wire.0);
    loop {
        let r = read_reply(&mut c, structured, t);
        if r.is_err() || c.position() == len {
            return r;
        }
    }
}

fn protocol(r: Result<Received, ReplyError>) -> ProtocolError {
    match r {
        Err(ReplyError::Protocol(p)) => p,
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

#[test]
fn data_and_holes_assemble_out_of_order() {
    let mut t = Table::new();
    let w = Wire::default()
        .data(0, 1, 4096 + 512, &[7; 512])
        .hole(0, 1, 4096, 256)
        .data(0, 1, 4096 + 256, &[9; 256])
        .none(1);
    assert_eq!(run(w, true, &mut t).unwrap(), Received { cookie: 1, done: true });
    let (p, buf) = &t.0[&1];
    assert!(p.error.is_none());
    assert_eq!(&buf[..256], &[0; 256][..]);
    assert_eq!(&buf[256..512], &[9; 256][..]);
    assert_eq!(&buf[512..], &[7; 512][..]);
    assert_eq!(p.coverage.ranges, vec![(4096, 5120)]);
}

#[test]
fn a_content_chunk_may_be_the_last() {
    let mut t = Table::new();
    let r = run(Wire::default().data(FLAG_DONE, 3, 0, &[1; 16]), true, &mut t).unwrap();
    assert!(r.done);
}

#[test]
fn simple_replies() {
    let mut t = Table::new();
    let mut w = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    w.extend_from_slice(&0u32.to_be_bytes());
    w.extend_from_slice(&3u64.to_be_bytes());
    w.extend_from_slice(&[5; 16]);
    assert!(run(Wire(w.clone()), false, &mut t).unwrap().done);
    assert_eq!(t.0[&3].1, vec![5; 16]);
    // With structured replies negotiated, a successful simple reply to a read is invalid.
    assert_eq!(protocol(run(Wire(w), true, &mut Table::new())), ProtocolError::SimpleReply("NBD_CMD_READ"));
    // An error simple reply carries no data and is fine either way.
    let mut w = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    w.extend_from_slice(&5u32.to_be_bytes());
    w.extend_from_slice(&2u64.to_be_bytes());
    let mut t = Table::new();
    assert!(run(Wire(w), true, &mut t).unwrap().done);
    assert_eq!(t.0[&2].0.error.as_ref().map(|e| e.errno), Some(5));
}

#[test]
fn errors_are_recorded_with_their_offset() {
    let mut t = Table::new();
    let w = Wire::default().error(0, 1, 5, "Input/output error", Some(4100)).error(FLAG_DONE, 1, 5, "", Some(4200));
    assert!(run(w, true, &mut t).unwrap().done);
    let e = t.0[&1].0.error.clone().unwrap();
    assert_eq!(e, ServerError { errno: 5, message: "Input/output error".into(), offset: Some(4100) });
    let mut t = Table::new();
    assert!(run(Wire::default().error(FLAG_DONE, 2, 22, "bad", None), true, &mut t).unwrap().done);
    // Unknown error types are errors too, and may be followed by more chunks.
    let mut t = Table::new();
    let w = Wire::default().chunk(0, 0x8123, 3, &[0, 0, 0, 5, 0, 1, b'x', 1, 2, 3]).none(3);
    assert!(run(w, true, &mut t).unwrap().done);
    assert_eq!(t.0[&3].0.error.as_ref().map(|e| e.message.as_str()), Some("x"));
}

#[test]
fn block_status_is_clipped_and_complete() {
    let mut t = Table::new();
    let w = Wire::default().status(0, 2, 11, &[(4096, 1), (65536, 0)]).status(FLAG_DONE, 2, 10, &[(512, 3)]);
    assert!(run(w, true, &mut t).unwrap().done);
    let p = &t.0[&2].0;
    let get = |id| p.extents.iter().find(|(i, _)| *i == id).unwrap().1.clone();
    let e = |offset, length, flags| Extent { offset, length, flags };
    assert_eq!(get(11), vec![e(0, 4096, 1), e(4096, 4096, 0)]);
    assert_eq!(get(10), vec![e(0, 512, 3)]);
}

#[test]
fn malformed_replies_are_typed_errors() {
    let t = Table::new;
    let r = |w: Wire| protocol(run(w, true, &mut t()));
    assert!(matches!(r(Wire(vec![0xde, 0xad, 0xbe, 0xef])), ProtocolError::BadMagic { .. }));
    assert_eq!(r(Wire::default().none(99)), ProtocolError::UnknownCookie(99));
    assert!(matches!(r(Wire::default().data(0, 1, 0, &[1; 8])), ProtocolError::OutsideRequest { .. }));
    assert!(matches!(r(Wire::default().data(0, 1, 5000, &[1; 200])), ProtocolError::OutsideRequest { .. }));
    assert!(matches!(r(Wire::default().data(0, 1, u64::MAX - 2, &[1; 8])), ProtocolError::OutsideRequest { .. }));
    let overlap = Wire::default().data(0, 1, 4096, &[1; 100]).hole(0, 1, 4096 + 50, 10);
    assert!(matches!(r(overlap), ProtocolError::Overlap { .. }));
    let short = Wire::default().data(0, 1, 4096, &[1; 100]).none(1);
    assert_eq!(r(short), ProtocolError::IncompleteRead { covered: 100, len: 1024 });
    assert!(matches!(r(Wire::default().hole(0, 1, 4096, 0)), ProtocolError::BadLength { .. }));
    assert!(matches!(r(Wire::default().chunk(0, TYPE_OFFSET_HOLE, 1, &[0; 11])), ProtocolError::BadLength { .. }));
    assert!(matches!(r(Wire::default().chunk(0, TYPE_OFFSET_DATA, 1, &[0; 8])), ProtocolError::BadLength { .. }));
    assert!(matches!(r(Wire::default().chunk(FLAG_DONE, TYPE_NONE, 1, &[0])), ProtocolError::BadLength { .. }));
    assert_eq!(r(Wire::default().chunk(0, TYPE_NONE, 1, &[])), ProtocolError::NoneWithoutDone);
    assert_eq!(r(Wire::default().chunk(0, 77, 1, &[])), ProtocolError::UnknownChunkType(77));
    assert!(matches!(r(Wire::default().status(0, 1, 10, &[(1, 0)])), ProtocolError::UnexpectedChunk { .. }));
    assert!(matches!(r(Wire::default().hole(0, 2, 0, 10)), ProtocolError::UnexpectedChunk { .. }));
    assert_eq!(r(Wire::default().status(0, 2, 12, &[(1, 0)])), ProtocolError::UnknownContextId(12));
    assert_eq!(
        r(Wire::default().status(0, 2, 10, &[(1, 0)]).status(0, 2, 10, &[(1, 0)])),
        ProtocolError::DuplicateContext(10)
    );
    assert_eq!(r(Wire::default().status(FLAG_DONE, 2, 10, &[(1, 0)])), ProtocolError::MissingContext(11));
    assert_eq!(r(Wire::default().status(0, 2, 10, &[(0, 0)])), ProtocolError::EmptyExtent);
    assert_eq!(r(Wire::default().status(0, 2, 10, &[(8192, 0), (1, 0)])), ProtocolError::ExtentsPastRequest);
    assert!(matches!(r(Wire::default().chunk(0, TYPE_BLOCK_STATUS, 2, &[0; 13])), ProtocolError::BadLength { .. }));
    assert!(matches!(
        r(Wire::default().chunk(0, TYPE_ERROR, 1, &[0, 0, 0, 5, 0, 9, b'x'])),
        ProtocolError::BadLength { .. }
    ));
    assert!(matches!(r(Wire::default().error(0, 1, 5, "", Some(0))), ProtocolError::OutsideRequest { .. }));
    let mut w = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    w.extend_from_slice(&[0; 12]);
    assert_eq!(protocol(run(Wire(w), false, &mut t())), ProtocolError::UnknownCookie(0));
    assert_eq!(protocol(run(Wire::default().none(1), false, &mut t())), ProtocolError::StructuredNotNegotiated);
}

#[test]
fn absurd_lengths_are_refused_before_reading() {
    // Headers claiming ~4 GiB payloads, with nothing behind them: refused at once, not
    // an attempt to read (which would give an I/O error) or to allocate.
    let header = |kind: u16, cookie: u64| {
        let mut w = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        w.extend_from_slice(&0u16.to_be_bytes());
        w.extend_from_slice(&kind.to_be_bytes());
        w.extend_from_slice(&cookie.to_be_bytes());
        w.extend_from_slice(&0xffff_fff4u32.to_be_bytes());
        w
    };
    let mut w = header(TYPE_OFFSET_DATA, 1);
    w.extend_from_slice(&4096u64.to_be_bytes());
    assert!(matches!(protocol(run(Wire(w), true, &mut Table::new())), ProtocolError::OutsideRequest { .. }));
    assert!(matches!(
        protocol(run(Wire(header(TYPE_BLOCK_STATUS, 2)), true, &mut Table::new())),
        ProtocolError::TooLong { .. }
    ));
    assert!(matches!(
        protocol(run(Wire(header(TYPE_ERROR, 1)), true, &mut Table::new())),
        ProtocolError::TooLong { .. }
    ));
}

#[test]
fn coverage_rejects_every_overlap() {
    let mut c = Coverage::default();
    c.insert(10, 20).unwrap();
    c.insert(30, 40).unwrap();
    for (s, e) in [(5, 11), (19, 25), (15, 16), (25, 31), (0, 100), (39, 50)] {
        assert!(c.insert(s, e).is_err(), "[{s},{e})");
    }
    c.insert(20, 30).unwrap();
    c.insert(0, 10).unwrap();
    assert_eq!((c.ranges.clone(), c.total), (vec![(0, 40)], 40));
}

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Random messages built from plausible pieces: right or wrong magics, known or unknown
/// cookies, every chunk type, lengths near the boundaries and far beyond them.
fn random_wire(rng: &mut Rng) -> Vec<u8> {
    let mut w = Vec::new();
    for _ in 0..rng.below(6) + 1 {
        let magic = match rng.below(8) {
            0 => SIMPLE_REPLY_MAGIC,
            1 => rng.next() as u32,
            _ => STRUCTURED_REPLY_MAGIC,
        };
        w.extend_from_slice(&magic.to_be_bytes());
        w.extend_from_slice(&(rng.below(4) as u16).to_be_bytes());
        let kinds = [0u16, 1, 2, 5, 0x8001, 0x8002, 0x8003, 3, rng.next() as u16];
        w.extend_from_slice(&kinds[rng.below(kinds.len() as u64) as usize].to_be_bytes());
        w.extend_from_slice(&(rng.below(5)).to_be_bytes());
        let len = match rng.below(4) {
            0 => rng.below(40) as u32,
            1 => rng.next() as u32,
            _ => [0u32, 6, 9, 12, 14, 20, 1032, 4 + 8 * 3][rng.below(8) as usize],
        };
        w.extend_from_slice(&len.to_be_bytes());
        for _ in 0..rng.below(64) {
            let b = match rng.below(4) {
                0 => 0,
                1 => 0x10,
                _ => rng.next() as u8,
            };
            w.push(b);
        }
    }
    w
}

#[test]
fn random_and_truncated_input_never_panics() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut outcomes = [0usize; 3];
    for _ in 0..20_000 {
        let wire = if rng.below(4) == 0 {
            (0..rng.below(200)).map(|_| rng.next() as u8).collect()
        } else {
            random_wire(&mut rng)
        };
        for structured in [true, false] {
            let mut t = Table::new();
            let mut c = Cursor::new(&wire);
            // Replies are removed from the table when done, as the client does.
            loop {
                match read_reply(&mut c, structured, &mut t) {
                    Ok(r) => {
                        outcomes[0] += 1;
                        if r.done {
                            t.0.remove(&r.cookie);
                        }
                    }
                    Err(ReplyError::Io(e)) => {
                        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
                        outcomes[1] += 1;
                        break;
                    }
                    Err(ReplyError::Protocol(_)) => {
                        outcomes[2] += 1;
                        break;
                    }
                }
            }
        }
    }
    // The generator must reach all three outcomes, or it tests little.
    assert!(outcomes.iter().all(|&n| n > 100), "{outcomes:?}");

    // Every prefix of a valid exchange: an end-of-file error or a clean stop, never more.
    let valid = Wire::default()
        .data(0, 1, 4096, &[1; 512])
        .hole(0, 1, 4608, 512)
        .status(0, 2, 10, &[(4096, 0), (4096, 1)])
        .status(FLAG_DONE, 2, 11, &[(8192, 2)])
        .error(FLAG_DONE, 3, 5, "boom", Some(3))
        .none(1)
        .0;
    for cut in 0..=valid.len() {
        let mut t = Table::new();
        let mut c = Cursor::new(&valid[..cut]);
        while (c.position() as usize) < cut {
            match read_reply(&mut c, true, &mut t) {
                Ok(_) => {}
                Err(ReplyError::Io(e)) => {
                    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
                    break;
                }
                Err(ReplyError::Protocol(p)) => panic!("prefix {cut}: {p}"),
            }
        }
    }
}
