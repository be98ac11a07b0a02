//! Transmission-phase replies: simple replies and structured reply chunks, parsed and
//! checked against the request they answer.
//!
//! ```text
//! simple:     32 bits 0x67446698 | 32 bits error | 64 bits cookie | (read data)
//! structured: 32 bits 0x668e33ef | 16 bits flags | 16 bits type | 64 bits cookie
//!             | 32 bits length | length bytes of payload
//! ```
//!
//! [`read_reply`] reads exactly one message and applies it to the [`Pending`] state of its
//! cookie. It checks everything the server sends: the magic, that the cookie is in flight,
//! that the chunk type fits the command, that every length is consistent and bounded
//! *before* anything is read or allocated, that content lies inside the request and does
//! not overlap earlier content, and (on the final chunk) that a successful read covered
//! every byte and a block status answered every context. Read data goes straight from
//! the socket into the callers' buffers ([`Inflight::fill`]); holes are zero-filled there.

use std::io::{self, Read};

use crate::error::ProtocolError;
use crate::extent::Extent;
use crate::request::Command;

pub(crate) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub(crate) const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub(crate) const FLAG_DONE: u16 = 1 << 0;

pub(crate) const TYPE_NONE: u16 = 0;
pub(crate) const TYPE_OFFSET_DATA: u16 = 1;
pub(crate) const TYPE_OFFSET_HOLE: u16 = 2;
pub(crate) const TYPE_BLOCK_STATUS: u16 = 5;
const TYPE_ERROR_BIT: u16 = 1 << 15;
pub(crate) const TYPE_ERROR: u16 = TYPE_ERROR_BIT | 1;
const TYPE_ERROR_OFFSET: u16 = TYPE_ERROR_BIT | 2;

/// Largest error chunk payload accepted (messages are at most 4096 bytes).
pub(crate) const MAX_ERROR_PAYLOAD: u32 = 64 * 1024;
/// Largest block status chunk payload accepted: a million extents.
pub(crate) const MAX_BLOCK_STATUS_PAYLOAD: u32 = 4 + 8 * 1024 * 1024;
/// Error chunks accepted in one reply (the protocol allows several `ERROR_OFFSET`s).
const MAX_ERRORS: u32 = 1024;
/// Disjoint fragments a read may be delivered in before the server is deemed hostile.
const MAX_FRAGMENTS: usize = 64 * 1024;

/// An error the server reported for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServerError {
    pub(crate) errno: u32,
    pub(crate) message: String,
    /// Where it happened, from `NBD_REPLY_TYPE_ERROR_OFFSET`.
    pub(crate) offset: Option<u64>,
}

/// What the client knows about one request in flight, and what its reply built so far.
#[derive(Debug)]
pub(crate) struct Pending {
    pub(crate) command: Command,
    pub(crate) offset: u64,
    pub(crate) len: u32,
    coverage: Coverage,
    pub(crate) error: Option<ServerError>,
    errors_seen: u32,
    /// Block status: the context ids the reply must answer.
    contexts: Vec<u32>,
    pub(crate) extents: Vec<(u32, Vec<Extent>)>,
}

impl Pending {
    pub(crate) fn read(offset: u64, len: u32) -> Pending {
        Pending::new(Command::Read, offset, len, Vec::new())
    }

    pub(crate) fn block_status(offset: u64, len: u32, contexts: Vec<u32>) -> Pending {
        Pending::new(Command::BlockStatus, offset, len, contexts)
    }

    fn new(command: Command, offset: u64, len: u32, contexts: Vec<u32>) -> Pending {
        Pending {
            command,
            offset,
            len,
            coverage: Coverage::default(),
            error: None,
            errors_seen: 0,
            contexts,
            extents: Vec::new(),
        }
    }

    fn end(&self) -> u64 {
        self.offset + u64::from(self.len)
    }

    /// Checks that `[start, start + len)` lies inside the request; returns the position of
    /// `start` relative to the request.
    fn locate(&self, what: &'static str, start: u64, len: u64) -> Result<usize, ProtocolError> {
        let end = start.checked_add(len);
        match end {
            Some(end) if start >= self.offset && end <= self.end() => Ok((start - self.offset) as usize),
            _ => Err(ProtocolError::OutsideRequest {
                what,
                start,
                end: end.unwrap_or(u64::MAX),
                req_start: self.offset,
                req_end: self.end(),
            }),
        }
    }

    fn record_error(&mut self, e: ServerError) -> Result<(), ProtocolError> {
        self.errors_seen += 1;
        if self.errors_seen > MAX_ERRORS {
            return Err(ProtocolError::TooMany("error chunks"));
        }
        self.error.get_or_insert(e);
        Ok(())
    }

    /// The final chunk arrived: a reply without errors must be complete.
    fn finish(&self) -> Result<(), ProtocolError> {
        if self.error.is_some() {
            return Ok(());
        }
        match self.command {
            Command::Read if self.coverage.total != u64::from(self.len) => {
                Err(ProtocolError::IncompleteRead { covered: self.coverage.total, len: self.len.into() })
            }
            Command::BlockStatus => match self.contexts.iter().find(|id| !self.extents.iter().any(|(e, _)| e == *id)) {
                Some(id) => Err(ProtocolError::MissingContext(*id)),
                None => Ok(()),
            },
            _ => Ok(()),
        }
    }
}

/// The byte ranges of a read already delivered: sorted, disjoint, touching ones merged.
#[derive(Debug, Default)]
struct Coverage {
    ranges: Vec<(u64, u64)>,
    total: u64,
}

impl Coverage {
    fn insert(&mut self, start: u64, end: u64) -> Result<(), ProtocolError> {
        let i = self.ranges.partition_point(|&(s, _)| s < start);
        let overlaps_prev = i > 0 && self.ranges[i - 1].1 > start;
        let overlaps_next = i < self.ranges.len() && self.ranges[i].0 < end;
        if overlaps_prev || overlaps_next {
            return Err(ProtocolError::Overlap { start, end });
        }
        let joins_prev = i > 0 && self.ranges[i - 1].1 == start;
        let joins_next = i < self.ranges.len() && self.ranges[i].0 == end;
        match (joins_prev, joins_next) {
            (true, true) => {
                self.ranges[i - 1].1 = self.ranges[i].1;
                self.ranges.remove(i);
            }
            (true, false) => self.ranges[i - 1].1 = end,
            (false, true) => self.ranges[i].0 = start,
            (false, false) => {
                if self.ranges.len() >= MAX_FRAGMENTS {
                    return Err(ProtocolError::TooMany("disjoint content chunks"));
                }
                self.ranges.insert(i, (start, end));
            }
        }
        self.total += end - start;
        Ok(())
    }
}

/// The requests in flight, by cookie: their state, and for reads the buffer space their
/// data goes to (which may be scattered over several callers' buffers).
pub(crate) trait Inflight {
    fn pending(&mut self, cookie: u64) -> Option<&mut Pending>;

    /// Calls `f` on the buffer space for bytes `at..at + len` of the request (relative to
    /// its offset), in order, in as many pieces as the space is split into.
    fn fill(
        &mut self,
        cookie: u64,
        at: usize,
        len: usize,
        f: &mut dyn FnMut(&mut [u8]) -> io::Result<()>,
    ) -> io::Result<()>;
}

/// What to do with the bytes a content chunk describes.
enum Content {
    /// Read `len` bytes from the stream into the request's buffer at `at`.
    Data { at: usize, len: usize },
    /// Zero `len` bytes at `at`.
    Hole { at: usize, len: usize },
}

/// One message was read and applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Received {
    pub(crate) cookie: u64,
    /// The reply for this cookie is complete; its [`Pending`] holds the outcome.
    pub(crate) done: bool,
}

/// Why no message could be read: the transport failed, or the server broke the protocol.
#[derive(Debug)]
pub(crate) enum ReplyError {
    Io(io::Error),
    Protocol(ProtocolError),
}

impl From<io::Error> for ReplyError {
    fn from(e: io::Error) -> Self {
        ReplyError::Io(e)
    }
}

impl From<ProtocolError> for ReplyError {
    fn from(e: ProtocolError) -> Self {
        ReplyError::Protocol(e)
    }
}

/// Reads one reply message (a simple reply or one structured chunk) and applies it.
pub(crate) fn read_reply<R: Read, T: Inflight + ?Sized>(
    r: &mut R,
    structured: bool,
    table: &mut T,
) -> Result<Received, ReplyError> {
    let magic = read_u32(r)?;
    let (cookie, done, content) = match magic {
        SIMPLE_REPLY_MAGIC => {
            let error = read_u32(r)?;
            let cookie = read_u64(r)?;
            let pending = table.pending(cookie).ok_or(ProtocolError::UnknownCookie(cookie))?;
            let content = if error != 0 {
                // An error reply carries no payload, whatever was negotiated.
                pending.record_error(ServerError { errno: error, message: String::new(), offset: None })?;
                None
            } else if structured || pending.command != Command::Read {
                return Err(ProtocolError::SimpleReply(pending.command.name()).into());
            } else {
                pending.coverage.insert(pending.offset, pending.end())?;
                Some(Content::Data { at: 0, len: pending.len as usize })
            };
            (cookie, true, content)
        }
        STRUCTURED_REPLY_MAGIC => {
            if !structured {
                return Err(ProtocolError::StructuredNotNegotiated.into());
            }
            let flags = read_u16(r)?;
            let kind = read_u16(r)?;
            let cookie = read_u64(r)?;
            let length = read_u32(r)?;
            let pending = table.pending(cookie).ok_or(ProtocolError::UnknownCookie(cookie))?;
            let content = apply_chunk(r, kind, length, pending)?;
            let done = flags & FLAG_DONE != 0;
            if kind == TYPE_NONE && !done {
                return Err(ProtocolError::NoneWithoutDone.into());
            }
            (cookie, done, content)
        }
        other => return Err(ProtocolError::BadMagic { what: "reply", got: other.into() }.into()),
    };
    match content {
        Some(Content::Data { at, len }) => table.fill(cookie, at, len, &mut |buf| r.read_exact(buf))?,
        Some(Content::Hole { at, len }) => table.fill(cookie, at, len, &mut |buf| {
            buf.fill(0);
            Ok(())
        })?,
        None => {}
    }
    if done {
        table.pending(cookie).ok_or(ProtocolError::UnknownCookie(cookie))?.finish()?;
    }
    Ok(Received { cookie, done })
}

/// Checks one structured chunk against its request and reads its payload, except the data
/// of a content chunk, which is left on the stream for the caller to place.
fn apply_chunk<R: Read>(
    r: &mut R,
    kind: u16,
    length: u32,
    pending: &mut Pending,
) -> Result<Option<Content>, ReplyError> {
    let bad_length = |what| ProtocolError::BadLength { what, length: length.into() };
    let unexpected = |p: &Pending| ProtocolError::UnexpectedChunk { chunk_type: kind, command: p.command.name() };
    match kind {
        TYPE_NONE => {
            if length != 0 {
                return Err(bad_length("NBD_REPLY_TYPE_NONE").into());
            }
        }
        TYPE_OFFSET_DATA => {
            if pending.command != Command::Read {
                return Err(unexpected(pending).into());
            }
            if length < 9 {
                return Err(bad_length("NBD_REPLY_TYPE_OFFSET_DATA").into());
            }
            let offset = read_u64(r)?;
            let n = u64::from(length - 8);
            let at = pending.locate("data chunk", offset, n)?;
            pending.coverage.insert(offset, offset + n)?;
            return Ok(Some(Content::Data { at, len: n as usize }));
        }
        TYPE_OFFSET_HOLE => {
            if pending.command != Command::Read {
                return Err(unexpected(pending).into());
            }
            if length != 12 {
                return Err(bad_length("NBD_REPLY_TYPE_OFFSET_HOLE").into());
            }
            let offset = read_u64(r)?;
            let n = u64::from(read_u32(r)?);
            if n == 0 {
                return Err(ProtocolError::BadLength { what: "hole size", length: 0 }.into());
            }
            let at = pending.locate("hole chunk", offset, n)?;
            pending.coverage.insert(offset, offset + n)?;
            return Ok(Some(Content::Hole { at, len: n as usize }));
        }
        TYPE_BLOCK_STATUS => {
            if pending.command != Command::BlockStatus {
                return Err(unexpected(pending).into());
            }
            if length < 12 || !(length - 4).is_multiple_of(8) {
                return Err(bad_length("NBD_REPLY_TYPE_BLOCK_STATUS").into());
            }
            if length > MAX_BLOCK_STATUS_PAYLOAD {
                let limit = MAX_BLOCK_STATUS_PAYLOAD.into();
                return Err(ProtocolError::TooLong { what: "block status chunk", length: length.into(), limit }.into());
            }
            let id = read_u32(r)?;
            if !pending.contexts.contains(&id) {
                return Err(ProtocolError::UnknownContextId(id).into());
            }
            if pending.extents.iter().any(|(e, _)| *e == id) {
                return Err(ProtocolError::DuplicateContext(id).into());
            }
            let mut extents = Vec::new();
            let mut pos = pending.offset;
            for _ in 0..(length - 4) / 8 {
                let len = u64::from(read_u32(r)?);
                let flags = read_u32(r)?;
                if len == 0 {
                    return Err(ProtocolError::EmptyExtent.into());
                }
                if pos >= pending.end() {
                    return Err(ProtocolError::ExtentsPastRequest.into());
                }
                // The last extent may run past the request; clip it.
                let clipped = len.min(pending.end() - pos);
                extents.push(Extent { offset: pos, length: clipped, flags });
                pos += clipped;
            }
            pending.extents.push((id, extents));
        }
        // ERROR, ERROR_OFFSET, and unknown types with the error bit: errors all the same.
        kind if kind == TYPE_ERROR || kind & TYPE_ERROR_BIT != 0 => {
            let min = if kind == TYPE_ERROR_OFFSET { 14 } else { 6 };
            if length < min {
                return Err(bad_length("error chunk").into());
            }
            if length > MAX_ERROR_PAYLOAD {
                let limit = MAX_ERROR_PAYLOAD.into();
                return Err(ProtocolError::TooLong { what: "error chunk", length: length.into(), limit }.into());
            }
            let mut payload = vec![0u8; length as usize];
            r.read_exact(&mut payload)?;
            let errno = u32::from_be_bytes(payload[0..4].try_into().expect("4 bytes"));
            let msg_len = usize::from(u16::from_be_bytes([payload[4], payload[5]]));
            if msg_len + min as usize > payload.len() {
                return Err(ProtocolError::BadLength { what: "error message", length: msg_len as u64 }.into());
            }
            let message = String::from_utf8_lossy(&payload[6..6 + msg_len]).into_owned();
            let offset = if kind == TYPE_ERROR_OFFSET {
                let at = 6 + msg_len;
                let offset = u64::from_be_bytes(payload[at..at + 8].try_into().expect("8 bytes"));
                pending.locate("error offset", offset, 1)?;
                Some(offset)
            } else {
                None
            };
            pending.record_error(ServerError { errno, message, offset })?;
        }
        other => return Err(ProtocolError::UnknownChunkType(other).into()),
    }
    Ok(None)
}

fn read_u16<R: Read>(r: &mut R) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32<R: Read>(r: &mut R) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64<R: Read>(r: &mut R) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

#[cfg(test)]
mod tests;
