//! A read-only NBD server: fixed newstyle handshake, structured replies, `base:allocation`.
//!
//! Each export is an [`Export`] (its size, a read, and which ranges are zeros), named.
//! [`serve`] runs one client's session over any stream: options (`NBD_OPT_GO`, `INFO`,
//! `EXPORT_NAME`, `LIST`, `ABORT`, `STRUCTURED_REPLY`, `SET_META_CONTEXT`,
//! `LIST_META_CONTEXT`), then requests (`READ`, `BLOCK_STATUS`, `FLUSH`, `DISC`). With
//! structured replies, zero ranges of a read go out as `OFFSET_HOLE` chunks (nothing on the
//! wire) and `base:allocation` reports them as holes (`NBD_STATE_HOLE | NBD_STATE_ZERO`).
//!
//! ## Invariants
//!
//! - Read-only: the export is announced with `NBD_FLAG_READ_ONLY`; `WRITE`, `TRIM` and
//!   `WRITE_ZEROES` answer `EPERM` (a write's data is read and dropped, so the session goes
//!   on); unknown commands answer `EINVAL`. [`Export`] has no write method at all.
//! - A request outside the export (or longer than [`MAX_REQUEST`]) answers `EINVAL`; an
//!   [`Export`] error answers `EIO` with its message. Neither ends the session.
//! - The client is never trusted: every length is bounded before anything is read or
//!   allocated (options at 64 KiB, requests and write data at [`MAX_REQUEST`]). A client
//!   that breaks the protocol (bad magic, truncated option, unknown export after
//!   `NBD_OPT_EXPORT_NAME`) ends its own session with an error — never a panic, and never
//!   affecting other sessions: each runs on its own stream, sharing only the exports.
//! - Wire constants are the client's (`handshake`, `reply`, `request`), so both sides of
//!   the crate speak from one list.

use std::io::{self, Read, Write};
use std::sync::Arc;

use crate::extent::{BASE_ALLOCATION, STATE_HOLE, STATE_ZERO};
use crate::handshake::{
    FLAG_CAN_MULTI_CONN, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, FLAG_READ_ONLY, IHAVEOPT, INFO_BLOCK_SIZE, INFO_EXPORT,
    MAX_REQUEST, NBDMAGIC, OPTION_REPLY_MAGIC, OPT_EXPORT_NAME, OPT_GO, OPT_SET_META_CONTEXT, OPT_STRUCTURED_REPLY,
    REP_ACK, REP_ERR_BIT, REP_ERR_UNKNOWN, REP_ERR_UNSUP, REP_INFO, REP_META_CONTEXT,
};
use crate::reply::{
    FLAG_DONE, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, TYPE_BLOCK_STATUS, TYPE_ERROR, TYPE_OFFSET_DATA,
    TYPE_OFFSET_HOLE,
};
use crate::request::REQUEST_MAGIC;

const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_LIST_META_CONTEXT: u32 = 9;
const REP_SERVER: u32 = 2;
const REP_ERR_INVALID: u32 = REP_ERR_BIT | 3;
const FLAG_HAS_FLAGS: u16 = 1 << 0;
const FLAG_SEND_FLUSH: u16 = 1 << 2;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;
const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
/// Options larger than this are refused (names and queries are at most 4 KiB each).
const MAX_OPTION: u32 = 64 * 1024;
/// The context id given to `base:allocation`.
const BASE_ALLOCATION_ID: u32 = 1;

/// What the server exports: a fixed-size, read-only disk.
pub trait Export: Send + Sync {
    fn size(&self) -> u64;
    /// Fills `buf` with the bytes at `offset` (within the size).
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// The zero (unallocated) and data ranges covering `offset..offset + len`, in order:
    /// `(length, is_zero)`.
    fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, bool)>>;
}

/// Exports by name.
pub type Exports<'a> = Vec<(String, Arc<dyn Export + 'a>)>;

fn u16_be(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn u32_be(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn u64_be(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn protocol(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn option_reply(w: &mut impl Write, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    w.write_all(&out)
}

/// A cursor over an option's payload that refuses to read past its end.
struct Payload<'a>(&'a [u8]);

impl Payload<'_> {
    fn take(&mut self, n: usize) -> io::Result<&[u8]> {
        if self.0.len() < n {
            return Err(protocol("option payload too short"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn string(&mut self) -> io::Result<String> {
        let n = self.u32()? as usize;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
}

/// Serves one client until it disconnects. `Ok` for a clean end (including `ABORT` and
/// `DISC`); an error names what went wrong.
pub fn serve<S: Read + Write>(stream: &mut S, exports: &Exports<'_>) -> io::Result<()> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    stream.write_all(&hello)?;
    let client_flags = u32_be(stream)?;
    let no_zeroes = client_flags & u32::from(FLAG_NO_ZEROES) != 0;
    let mut structured = false;
    let mut allocation = false;
    let tx_flags = FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN;
    let find = |name: &str| {
        // The default export (empty name) is the first.
        exports.iter().find(|(n, _)| n == name).or_else(|| if name.is_empty() { exports.first() } else { None })
    };
    let export = loop {
        if u64_be(stream)? != IHAVEOPT {
            return Err(protocol("bad option magic"));
        }
        let option = u32_be(stream)?;
        let len = u32_be(stream)?;
        if len > MAX_OPTION {
            return Err(protocol(format!("option {option} of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        stream.read_exact(&mut data)?;
        let mut p = Payload(&data);
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some((_, e)) = find(&name) else {
                    return Err(protocol(format!("no export named {name:?}")));
                };
                let mut out = Vec::new();
                out.extend_from_slice(&e.size().to_be_bytes());
                out.extend_from_slice(&tx_flags.to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                stream.write_all(&out)?;
                break e.clone();
            }
            OPT_ABORT => {
                let _ = option_reply(stream, option, REP_ACK, &[]);
                return Ok(());
            }
            OPT_LIST => {
                for (name, _) in exports {
                    let mut d = (name.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(name.as_bytes());
                    option_reply(stream, option, REP_SERVER, &d)?;
                }
                option_reply(stream, option, REP_ACK, &[])?;
            }
            OPT_STRUCTURED_REPLY if !data.is_empty() => {
                option_reply(stream, option, REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")?
            }
            OPT_STRUCTURED_REPLY => {
                structured = true;
                option_reply(stream, option, REP_ACK, &[])?;
            }
            OPT_SET_META_CONTEXT | OPT_LIST_META_CONTEXT => {
                if !structured {
                    option_reply(stream, option, REP_ERR_INVALID, b"structured replies first")?;
                    continue;
                }
                let export = p.string()?;
                if find(&export).is_none() {
                    option_reply(stream, option, REP_ERR_UNKNOWN, format!("no export named {export:?}").as_bytes())?;
                    continue;
                }
                if option == OPT_SET_META_CONTEXT {
                    // Each SET replaces what an earlier one selected.
                    allocation = false;
                }
                let queries = p.u32()?;
                let mut grant = queries == 0 && option == OPT_LIST_META_CONTEXT;
                for _ in 0..queries {
                    let q = p.string()?;
                    grant |= q == BASE_ALLOCATION || (option == OPT_LIST_META_CONTEXT && q == "base:");
                }
                if grant {
                    if option == OPT_SET_META_CONTEXT {
                        allocation = true;
                    }
                    let mut d = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                    d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    option_reply(stream, option, REP_META_CONTEXT, &d)?;
                }
                option_reply(stream, option, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let name = p.string()?;
                let Some((_, e)) = find(&name) else {
                    option_reply(stream, option, REP_ERR_UNKNOWN, format!("no export named {name:?}").as_bytes())?;
                    continue;
                };
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&e.size().to_be_bytes());
                info.extend_from_slice(&tx_flags.to_be_bytes());
                option_reply(stream, option, REP_INFO, &info)?;
                let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                for v in [1u32, 4096, MAX_REQUEST] {
                    bs.extend_from_slice(&v.to_be_bytes());
                }
                option_reply(stream, option, REP_INFO, &bs)?;
                option_reply(stream, option, REP_ACK, &[])?;
                if option == OPT_GO {
                    break e.clone();
                }
            }
            _ => option_reply(stream, option, REP_ERR_UNSUP, &[])?,
        }
    };
    transmission(stream, export.as_ref(), structured, allocation)
}

fn simple_reply(w: &mut impl Write, cookie: u64, error: u32, data: &[u8]) -> io::Result<()> {
    let mut out = Vec::with_capacity(16 + data.len());
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(data);
    w.write_all(&out)
}

fn chunk(w: &mut impl Write, cookie: u64, flags: u16, kind: u16, payload: &[&[u8]]) -> io::Result<()> {
    let len: usize = payload.iter().map(|p| p.len()).sum();
    let mut head = Vec::with_capacity(20);
    head.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    head.extend_from_slice(&flags.to_be_bytes());
    head.extend_from_slice(&kind.to_be_bytes());
    head.extend_from_slice(&cookie.to_be_bytes());
    head.extend_from_slice(&(len as u32).to_be_bytes());
    w.write_all(&head)?;
    for p in payload {
        w.write_all(p)?;
    }
    Ok(())
}

fn error_reply(w: &mut impl Write, structured: bool, cookie: u64, errno: u32, msg: &str) -> io::Result<()> {
    if structured {
        let mut d = errno.to_be_bytes().to_vec();
        d.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        d.extend_from_slice(msg.as_bytes());
        chunk(w, cookie, FLAG_DONE, TYPE_ERROR, &[&d])
    } else {
        simple_reply(w, cookie, errno, &[])
    }
}

fn transmission<S: Read + Write>(s: &mut S, export: &dyn Export, structured: bool, allocation: bool) -> io::Result<()> {
    let size = export.size();
    loop {
        let magic = match u32_be(s) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        if magic != REQUEST_MAGIC {
            return Err(protocol("bad request magic"));
        }
        let flags = u16_be(s)?;
        let kind = u16_be(s)?;
        let cookie = u64_be(s)?;
        let offset = u64_be(s)?;
        let len = u32_be(s)?;
        let in_range = offset.checked_add(u64::from(len)).is_some_and(|end| end <= size);
        match kind {
            CMD_DISC => return Ok(()),
            // A write carries its data: it is read and dropped, so the next request
            // header is found where the client put it.
            CMD_WRITE if len > MAX_REQUEST => return Err(protocol(format!("write of {len} bytes"))),
            CMD_WRITE => {
                let skipped = io::copy(&mut Read::by_ref(s).take(u64::from(len)), &mut io::sink())?;
                if skipped != u64::from(len) {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "write request without its data"));
                }
                error_reply(s, structured, cookie, EPERM, "the export is read-only")?
            }
            CMD_TRIM | CMD_WRITE_ZEROES => error_reply(s, structured, cookie, EPERM, "the export is read-only")?,
            CMD_FLUSH => simple_or_done(s, structured, cookie)?,
            CMD_READ if !in_range || len > MAX_REQUEST => {
                error_reply(s, structured, cookie, EINVAL, "read outside the export")?
            }
            CMD_READ => read(s, export, structured, cookie, offset, len)?,
            CMD_BLOCK_STATUS if !structured || !allocation => {
                error_reply(s, structured, cookie, EINVAL, "no metadata context negotiated")?
            }
            CMD_BLOCK_STATUS if !in_range || len == 0 => {
                error_reply(s, true, cookie, EINVAL, "range outside the export")?
            }
            CMD_BLOCK_STATUS => {
                let mut ranges = match export.allocation(offset, u64::from(len)) {
                    Ok(r) => r,
                    Err(e) => {
                        error_reply(s, true, cookie, EIO, &e.to_string())?;
                        continue;
                    }
                };
                if flags & CMD_FLAG_REQ_ONE != 0 {
                    ranges.truncate(1);
                }
                let mut d = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                for (l, zero) in ranges {
                    d.extend_from_slice(&(l.min(u64::from(u32::MAX)) as u32).to_be_bytes());
                    d.extend_from_slice(&(if zero { STATE_HOLE | STATE_ZERO } else { 0 }).to_be_bytes());
                }
                chunk(s, cookie, FLAG_DONE, TYPE_BLOCK_STATUS, &[&d])?;
            }
            _ => error_reply(s, structured, cookie, EINVAL, &format!("command {kind} is not supported"))?,
        }
        s.flush()?;
    }
}

fn simple_or_done(s: &mut impl Write, structured: bool, cookie: u64) -> io::Result<()> {
    if structured {
        chunk(s, cookie, FLAG_DONE, crate::reply::TYPE_NONE, &[])
    } else {
        simple_reply(s, cookie, 0, &[])
    }
}

fn read(
    s: &mut impl Write,
    export: &dyn Export,
    structured: bool,
    cookie: u64,
    offset: u64,
    len: u32,
) -> io::Result<()> {
    if !structured {
        let mut buf = vec![0u8; len as usize];
        return match export.read(offset, &mut buf) {
            Ok(()) => simple_reply(s, cookie, 0, &buf),
            Err(_) => simple_reply(s, cookie, EIO, &[]),
        };
    }
    let ranges = export.allocation(offset, u64::from(len)).unwrap_or_else(|_| vec![(u64::from(len), false)]);
    let mut at = offset;
    let last = ranges.len().saturating_sub(1);
    for (k, (l, zero)) in ranges.into_iter().enumerate() {
        let flags = if k == last { FLAG_DONE } else { 0 };
        if zero {
            chunk(s, cookie, flags, TYPE_OFFSET_HOLE, &[&at.to_be_bytes(), &(l as u32).to_be_bytes()])?;
        } else {
            let mut buf = vec![0u8; l as usize];
            if let Err(e) = export.read(at, &mut buf) {
                return error_reply(s, true, cookie, EIO, &e.to_string());
            }
            chunk(s, cookie, flags, TYPE_OFFSET_DATA, &[&at.to_be_bytes(), &buf])?;
        }
        at += l;
    }
    if last == 0 && len == 0 {
        chunk(s, cookie, FLAG_DONE, crate::reply::TYPE_NONE, &[])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
