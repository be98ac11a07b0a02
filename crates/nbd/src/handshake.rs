//! The fixed newstyle handshake: from `NBDMAGIC` to the transmission phase.
//!
//! Order of options sent: `NBD_OPT_STRUCTURED_REPLY`, then (when contexts are wanted)
//! `NBD_OPT_SET_META_CONTEXT`, then `NBD_OPT_GO` asking for `NBD_INFO_BLOCK_SIZE`; a server
//! that answers `NBD_OPT_GO` with `NBD_REP_ERR_UNSUP` gets `NBD_OPT_EXPORT_NAME` instead.
//! Every reply is length-checked (at most [`MAX_OPTION_REPLY`] bytes) before its payload is
//! read; the client never sends an option before the final reply to the previous one.

use std::io::{self, Read, Write};

use crate::error::{Error, ProtocolError};

pub(crate) const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub(crate) const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
pub(crate) const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

pub(crate) const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub(crate) const FLAG_NO_ZEROES: u16 = 1 << 1;
const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub(crate) const FLAG_C_NO_ZEROES: u32 = 1 << 1;

pub(crate) const OPT_EXPORT_NAME: u32 = 1;
pub(crate) const OPT_GO: u32 = 7;
pub(crate) const OPT_STRUCTURED_REPLY: u32 = 8;
pub(crate) const OPT_SET_META_CONTEXT: u32 = 10;

pub(crate) const REP_ACK: u32 = 1;
pub(crate) const REP_INFO: u32 = 3;
pub(crate) const REP_META_CONTEXT: u32 = 4;
pub(crate) const REP_ERR_BIT: u32 = 1 << 31;
pub(crate) const REP_ERR_UNSUP: u32 = REP_ERR_BIT | 1;
const REP_ERR_TLS_REQD: u32 = REP_ERR_BIT | 5;
pub(crate) const REP_ERR_UNKNOWN: u32 = REP_ERR_BIT | 6;

pub(crate) const INFO_EXPORT: u16 = 0;
pub(crate) const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: the export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: several connections see one cache (safe to parallelise over them).
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// The largest option reply accepted. Strings are at most 4096 bytes by the protocol.
pub const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// The largest read or block-status request this client sends, whatever the server allows:
/// 32 MiB, the size every server must accept.
pub const MAX_REQUEST: u32 = 32 * 1024 * 1024;

/// The server's block size constraints (`NBD_INFO_BLOCK_SIZE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

/// A metadata context the server granted, with its id for this connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContext {
    pub id: u32,
    pub name: String,
}

/// What the handshake established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub export: String,
    /// Size of the export in bytes.
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*`).
    pub transmission_flags: u16,
    /// Block size constraints, when the server advertised them.
    pub block_size: Option<BlockSize>,
    pub structured_replies: bool,
    /// The granted metadata contexts, all of them requested by the client.
    pub contexts: Vec<MetaContext>,
}

impl ExportInfo {
    pub fn is_read_only(&self) -> bool {
        self.transmission_flags & FLAG_READ_ONLY != 0
    }

    pub fn can_multi_conn(&self) -> bool {
        self.transmission_flags & FLAG_CAN_MULTI_CONN != 0
    }

    /// The id of a granted context on this connection.
    pub fn context_id(&self, name: &str) -> Option<u32> {
        self.contexts.iter().find(|c| c.name == name).map(|c| c.id)
    }

    /// Offsets and lengths of requests must be multiples of this.
    pub fn min_block(&self) -> u32 {
        self.block_size.map_or(1, |b| b.minimum)
    }

    /// The largest request length this client sends: the server's maximum, capped at
    /// [`MAX_REQUEST`], rounded down to the minimum block size.
    pub fn max_request(&self) -> u32 {
        let max = self.block_size.map_or(MAX_REQUEST, |b| b.maximum.min(MAX_REQUEST));
        let min = self.min_block();
        (max / min * min).max(min)
    }
}

/// Runs the handshake on a freshly connected stream. `endpoint` only names the server in
/// errors.
pub(crate) fn negotiate<S: Read + Write>(
    s: &mut S,
    endpoint: &str,
    export: &str,
    contexts: &[String],
) -> Result<ExportInfo, Error> {
    let io_err = |source: io::Error| Error::HandshakeIo { endpoint: endpoint.to_string(), source };
    let proto = |e: ProtocolError| Error::Protocol { endpoint: endpoint.to_string(), source: e };
    let unsupported = |reason: &str| Error::NotSupported { endpoint: endpoint.to_string(), reason: reason.into() };

    let magic = read_u64(s).map_err(io_err)?;
    if magic != NBDMAGIC {
        return Err(unsupported(&format!("no NBDMAGIC greeting (got {magic:#018x})")));
    }
    let magic = read_u64(s).map_err(io_err)?;
    if magic == CLISERV_MAGIC {
        return Err(unsupported("oldstyle negotiation is not supported"));
    }
    if magic != IHAVEOPT {
        return Err(unsupported(&format!("unknown negotiation magic {magic:#018x}")));
    }
    let hflags = read_u16(s).map_err(io_err)?;
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(unsupported("the server lacks fixed newstyle negotiation"));
    }
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let cflags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
    s.write_all(&cflags.to_be_bytes()).map_err(io_err)?;

    // Structured replies: required for block status, wanted for reads (holes, errors).
    send_option(s, OPT_STRUCTURED_REPLY, &[]).map_err(io_err)?;
    let reply = read_reply(s, OPT_STRUCTURED_REPLY).map_err(|e| e.into_error(endpoint))?;
    let structured_replies = match reply.kind {
        REP_ACK if reply.data.is_empty() => true,
        REP_ACK => return Err(proto(bad_len("NBD_OPT_STRUCTURED_REPLY ack", reply.data.len()))),
        k if k & REP_ERR_BIT != 0 => false,
        k => return Err(proto(ProtocolError::Handshake(format!("unexpected reply {k} to STRUCTURED_REPLY")))),
    };

    let mut granted = Vec::new();
    if !contexts.is_empty() {
        if !structured_replies {
            return Err(Error::MetaContextsUnsupported { reason: "the server refused structured replies".into() });
        }
        let mut data = Vec::new();
        put_string(&mut data, export);
        data.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
        for c in contexts {
            put_string(&mut data, c);
        }
        send_option(s, OPT_SET_META_CONTEXT, &data).map_err(io_err)?;
        loop {
            let reply = read_reply(s, OPT_SET_META_CONTEXT).map_err(|e| e.into_error(endpoint))?;
            match reply.kind {
                REP_ACK => break,
                REP_META_CONTEXT => {
                    if reply.data.len() < 5 {
                        return Err(proto(bad_len("NBD_REP_META_CONTEXT", reply.data.len())));
                    }
                    let id = u32::from_be_bytes(reply.data[..4].try_into().expect("4 bytes"));
                    let name = String::from_utf8_lossy(&reply.data[4..]).into_owned();
                    if granted.iter().any(|c: &MetaContext| c.id == id) {
                        return Err(proto(ProtocolError::Handshake(format!("meta context id {id} granted twice"))));
                    }
                    if granted.len() >= 1024 {
                        return Err(proto(ProtocolError::TooMany("meta contexts")));
                    }
                    granted.push(MetaContext { id, name });
                }
                REP_ERR_UNSUP => {
                    return Err(Error::MetaContextsUnsupported {
                        reason: "NBD_OPT_SET_META_CONTEXT is not supported".into(),
                    })
                }
                k if k & REP_ERR_BIT != 0 => return Err(rejected("NBD_OPT_SET_META_CONTEXT", k, &reply.data)),
                k => return Err(proto(ProtocolError::Handshake(format!("unexpected reply {k} to SET_META_CONTEXT")))),
            }
        }
        for wanted in contexts {
            if !granted.iter().any(|c| &c.name == wanted) {
                return Err(match wanted.strip_prefix("qemu:dirty-bitmap:") {
                    Some(bitmap) => Error::BitmapNotFound { export: export.into(), bitmap: bitmap.into() },
                    None => Error::ContextNotGranted { export: export.into(), context: wanted.clone() },
                });
            }
        }
        // Contexts nobody asked for would still be answered in every block status reply;
        // they are kept so those replies validate, and simply never returned.
    }

    let mut data = Vec::new();
    put_string(&mut data, export);
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, OPT_GO, &data).map_err(io_err)?;
    let mut size_flags = None;
    let mut block_size = None;
    loop {
        let reply = read_reply(s, OPT_GO).map_err(|e| e.into_error(endpoint))?;
        match reply.kind {
            REP_INFO => {
                let d = &reply.data;
                if d.len() < 2 {
                    return Err(proto(bad_len("NBD_REP_INFO", d.len())));
                }
                match u16::from_be_bytes([d[0], d[1]]) {
                    INFO_EXPORT if d.len() == 12 => {
                        let size = u64::from_be_bytes(d[2..10].try_into().expect("8 bytes"));
                        size_flags = Some((size, u16::from_be_bytes([d[10], d[11]])));
                    }
                    INFO_EXPORT => return Err(proto(bad_len("NBD_INFO_EXPORT", d.len()))),
                    INFO_BLOCK_SIZE if d.len() == 14 => {
                        let word = |i: usize| u32::from_be_bytes(d[i..i + 4].try_into().expect("4 bytes"));
                        let b = BlockSize { minimum: word(2), preferred: word(6), maximum: word(10) };
                        check_block_size(&b).map_err(proto)?;
                        block_size = Some(b);
                    }
                    INFO_BLOCK_SIZE => return Err(proto(bad_len("NBD_INFO_BLOCK_SIZE", d.len()))),
                    _ => {} // NAME, DESCRIPTION and unknown information: ignored, as required.
                }
            }
            REP_ACK => {
                let (size, flags) = size_flags.ok_or_else(|| {
                    proto(ProtocolError::Handshake("NBD_OPT_GO succeeded without NBD_INFO_EXPORT".into()))
                })?;
                return Ok(info(export, size, flags, block_size, structured_replies, granted));
            }
            REP_ERR_UNKNOWN => {
                return Err(Error::ExportNotFound { export: export.into(), message: message(&reply.data) })
            }
            REP_ERR_TLS_REQD => return Err(Error::TlsRequired { export: export.into() }),
            REP_ERR_UNSUP => break, // an old server: fall back to NBD_OPT_EXPORT_NAME
            k if k & REP_ERR_BIT != 0 => return Err(rejected("NBD_OPT_GO", k, &reply.data)),
            k => return Err(proto(ProtocolError::Handshake(format!("unexpected reply {k} to NBD_OPT_GO")))),
        }
    }

    send_option(s, OPT_EXPORT_NAME, export.as_bytes()).map_err(io_err)?;
    let size = read_u64(s).map_err(|e| match e.kind() {
        // The server must close the connection when it has no such export.
        io::ErrorKind::UnexpectedEof => Error::ExportNotFound {
            export: export.into(),
            message: "the server closed the connection after NBD_OPT_EXPORT_NAME".into(),
        },
        _ => io_err(e),
    })?;
    let flags = read_u16(s).map_err(io_err)?;
    if !no_zeroes {
        let mut zeroes = [0u8; 124];
        s.read_exact(&mut zeroes).map_err(io_err)?;
    }
    Ok(info(export, size, flags, None, structured_replies, granted))
}

fn info(
    export: &str,
    size: u64,
    flags: u16,
    block_size: Option<BlockSize>,
    structured_replies: bool,
    contexts: Vec<MetaContext>,
) -> ExportInfo {
    ExportInfo { export: export.into(), size, transmission_flags: flags, block_size, structured_replies, contexts }
}

fn check_block_size(b: &BlockSize) -> Result<(), ProtocolError> {
    let ok = b.minimum.is_power_of_two()
        && b.minimum <= 65536
        && b.maximum >= b.minimum
        && (b.maximum == u32::MAX || b.maximum.is_multiple_of(b.minimum));
    if ok {
        Ok(())
    } else {
        Err(ProtocolError::Handshake(format!(
            "invalid block size constraints: minimum {}, preferred {}, maximum {}",
            b.minimum, b.preferred, b.maximum
        )))
    }
}

fn bad_len(what: &'static str, len: usize) -> ProtocolError {
    ProtocolError::BadLength { what, length: len as u64 }
}

fn message(data: &[u8]) -> String {
    String::from_utf8_lossy(data).into_owned()
}

fn rejected(option: &'static str, kind: u32, data: &[u8]) -> Error {
    Error::OptionRejected { option, reply: reply_name(kind), message: message(data) }
}

/// The protocol's name for an option reply type.
pub(crate) fn reply_name(kind: u32) -> String {
    let name = match kind {
        REP_ACK => "NBD_REP_ACK",
        REP_INFO => "NBD_REP_INFO",
        REP_META_CONTEXT => "NBD_REP_META_CONTEXT",
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        0x8000_0002 => "NBD_REP_ERR_POLICY",
        0x8000_0003 => "NBD_REP_ERR_INVALID",
        0x8000_0004 => "NBD_REP_ERR_PLATFORM",
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        0x8000_0007 => "NBD_REP_ERR_SHUTDOWN",
        0x8000_0008 => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        0x8000_0009 => "NBD_REP_ERR_TOO_BIG",
        0x8000_000a => "NBD_REP_ERR_EXT_HEADER_REQD",
        _ => return format!("option reply {kind:#x}"),
    };
    name.to_string()
}

struct OptionReply {
    kind: u32,
    data: Vec<u8>,
}

enum ReplyError {
    Io(io::Error),
    Protocol(ProtocolError),
}

impl ReplyError {
    fn into_error(self, endpoint: &str) -> Error {
        match self {
            ReplyError::Io(source) => Error::HandshakeIo { endpoint: endpoint.into(), source },
            ReplyError::Protocol(source) => Error::Protocol { endpoint: endpoint.into(), source },
        }
    }
}

fn read_reply<S: Read>(s: &mut S, option: u32) -> Result<OptionReply, ReplyError> {
    let mut head = [0u8; 20];
    s.read_exact(&mut head).map_err(ReplyError::Io)?;
    let magic = u64::from_be_bytes(head[..8].try_into().expect("8 bytes"));
    if magic != OPTION_REPLY_MAGIC {
        return Err(ReplyError::Protocol(ProtocolError::BadMagic { what: "option reply", got: magic }));
    }
    let got = u32::from_be_bytes(head[8..12].try_into().expect("4 bytes"));
    if got != option {
        return Err(ReplyError::Protocol(ProtocolError::WrongOption { expected: option, got }));
    }
    let kind = u32::from_be_bytes(head[12..16].try_into().expect("4 bytes"));
    let len = u32::from_be_bytes(head[16..20].try_into().expect("4 bytes"));
    if len > MAX_OPTION_REPLY {
        return Err(ReplyError::Protocol(ProtocolError::TooLong {
            what: "option reply",
            length: len.into(),
            limit: MAX_OPTION_REPLY.into(),
        }));
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).map_err(ReplyError::Io)?;
    Ok(OptionReply { kind, data })
}

fn send_option<S: Write>(s: &mut S, option: u32, data: &[u8]) -> io::Result<()> {
    let mut msg = Vec::with_capacity(16 + data.len());
    msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&option.to_be_bytes());
    msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
    msg.extend_from_slice(data);
    s.write_all(&msg)
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn read_u64<S: Read>(s: &mut S) -> io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn read_u16<S: Read>(s: &mut S) -> io::Result<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

#[cfg(test)]
mod tests;
