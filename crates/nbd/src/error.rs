//! Typed errors. Callers branch on [`Error`]: a missing bitmap ([`Error::BitmapNotFound`])
//! means "fall back to a full read", a lost connection ([`Error::ConnectionLost`]) names the
//! offset that could not be read, a malformed reply is a [`ProtocolError`].

use std::io;

/// Everything that can go wrong talking to an NBD server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The NBD URI could not be parsed or uses a form this client does not speak.
    #[error(transparent)]
    Uri(#[from] crate::uri::UriError),

    /// The transport could not be opened (no such socket, connection refused, ...).
    #[error("cannot connect to NBD server {endpoint}: {source}")]
    Connect { endpoint: String, source: io::Error },

    /// The connection failed during the handshake.
    #[error("I/O error during the NBD handshake with {endpoint}: {source}")]
    HandshakeIo { endpoint: String, source: io::Error },

    /// The peer is not an NBD server, or speaks a negotiation this client does not.
    #[error("{endpoint} is not a usable NBD server: {reason}")]
    NotSupported { endpoint: String, reason: String },

    /// `NBD_OPT_GO` answered `NBD_REP_ERR_UNKNOWN`: there is no export of that name.
    #[error("the NBD server has no export named {export:?}{}", message_suffix(message))]
    ExportNotFound { export: String, message: String },

    /// The dirty bitmap `bitmap` is not exported: the server did not grant the meta context
    /// `qemu:dirty-bitmap:<bitmap>` (qemu-nbd exports a bitmap only with `-B <bitmap>`).
    #[error("export {export:?} has no dirty bitmap {bitmap:?} (the server did not grant qemu:dirty-bitmap:{bitmap})")]
    BitmapNotFound { export: String, bitmap: String },

    /// Any other requested meta context was not granted by the server.
    #[error("export {export:?} does not provide the metadata context {context:?}")]
    ContextNotGranted { export: String, context: String },

    /// Meta contexts were requested but the server cannot provide them (no structured
    /// replies, or `NBD_OPT_SET_META_CONTEXT` unsupported).
    #[error("the NBD server does not support metadata contexts ({reason})")]
    MetaContextsUnsupported { reason: String },

    /// The server requires TLS, which this client does not implement.
    #[error("the NBD server requires TLS for export {export:?}; TLS is not supported by this client")]
    TlsRequired { export: String },

    /// The server answered an option with an error reply not covered above.
    #[error("the NBD server rejected {option} with {reply}{}", message_suffix(message))]
    OptionRejected { option: &'static str, reply: String, message: String },

    /// The server broke the protocol. The connection is dropped (hard disconnect).
    #[error("malformed reply from NBD server {endpoint}: {source}")]
    Protocol {
        endpoint: String,
        #[source]
        source: ProtocolError,
    },

    /// The server reported an error for a request (e.g. `EIO`), after the retries.
    #[error("NBD server error on {command} at offset {offset} ({len} bytes): {errno_name}{}", message_suffix(message))]
    Server { command: &'static str, offset: u64, len: u64, errno: u32, errno_name: &'static str, message: String },

    /// The connection dropped and could not be re-established, or kept dropping while this
    /// request was outstanding, within the retry policy.
    #[error("NBD connection to {endpoint} lost while reading offset {offset} ({len} bytes); gave up after {attempts} attempts: {last}")]
    ConnectionLost { endpoint: String, offset: u64, len: u64, attempts: u32, last: String },

    /// After a reconnect the export has a different size: it is not the same disk any more.
    #[error("export {export:?} changed size across a reconnect ({was} bytes, now {now} bytes)")]
    ExportResized { export: String, was: u64, now: u64 },

    /// The caller asked for bytes beyond the end of the export.
    #[error("request at offset {offset} ({len} bytes) is past the end of the export ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },

    /// The caller's offset or length is not a multiple of the server's minimum block size.
    #[error(
        "request at offset {offset} ({len} bytes) is not aligned to the export's {min_block}-byte minimum block size"
    )]
    Unaligned { offset: u64, len: u64, min_block: u32 },

    /// Block status was asked for a context that was not requested at connect time.
    #[error("metadata context {context:?} was not negotiated on this connection")]
    UnknownContext { context: String },
}

impl Error {
    /// Whether this error is worth a reconnect attempt: transport failures, not answers.
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::HandshakeIo { .. } => true,
            Error::OptionRejected { reply, .. } => reply == "NBD_REP_ERR_SHUTDOWN",
            _ => false,
        }
    }
}

fn message_suffix(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

/// A violation of the NBD protocol by the server. Never a panic: every field read from the
/// wire is checked before use, and lengths are bounded before anything is allocated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("bad magic {got:#x} in {what}")]
    BadMagic { what: &'static str, got: u64 },
    #[error("reply for unknown cookie {0:#x}")]
    UnknownCookie(u64),
    #[error("option reply for option {got} while waiting for option {expected}")]
    WrongOption { expected: u32, got: u32 },
    #[error("{what} has invalid length {length}")]
    BadLength { what: &'static str, length: u64 },
    #[error("{what} of {length} bytes exceeds the limit of {limit} bytes")]
    TooLong { what: &'static str, length: u64, limit: u64 },
    #[error("{what} [{start}, {end}) lies outside the request [{req_start}, {req_end})")]
    OutsideRequest { what: &'static str, start: u64, end: u64, req_start: u64, req_end: u64 },
    #[error("content chunk [{start}, {end}) overlaps earlier content")]
    Overlap { start: u64, end: u64 },
    #[error("reply covers {covered} of the {len} requested bytes but claims to be complete")]
    IncompleteRead { covered: u64, len: u64 },
    #[error("structured reply chunk type {chunk_type} is not valid for {command}")]
    UnexpectedChunk { chunk_type: u16, command: &'static str },
    #[error("unknown structured reply chunk type {0}")]
    UnknownChunkType(u16),
    #[error("structured reply received but structured replies were not negotiated")]
    StructuredNotNegotiated,
    #[error("simple reply without error to {0}, which requires a structured reply")]
    SimpleReply(&'static str),
    #[error("NBD_REPLY_TYPE_NONE without the DONE flag")]
    NoneWithoutDone,
    #[error("block status for metadata context id {0} which was not negotiated")]
    UnknownContextId(u32),
    #[error("block status for metadata context id {0} sent twice in one reply")]
    DuplicateContext(u32),
    #[error("block status reply without a chunk for metadata context id {0}")]
    MissingContext(u32),
    #[error("block status extent of length zero")]
    EmptyExtent,
    #[error("block status extents run past the request before the last one")]
    ExtentsPastRequest,
    #[error("too many {0} in one reply")]
    TooMany(&'static str),
    #[error("{0}")]
    Handshake(String),
}

/// The name of an NBD error value, as the protocol defines them.
pub fn errno_name(errno: u32) -> &'static str {
    match errno {
        0 => "no error code",
        1 => "EPERM (operation not permitted)",
        5 => "EIO (input/output error)",
        12 => "ENOMEM (cannot allocate memory)",
        22 => "EINVAL (invalid argument)",
        28 => "ENOSPC (no space left on device)",
        75 => "EOVERFLOW (value too large)",
        95 => "ENOTSUP (operation not supported)",
        108 => "ESHUTDOWN (server is shutting down)",
        _ => "unknown NBD error value",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_what_matters() {
        let e = Error::BitmapNotFound { export: "disk".into(), bitmap: "b1".into() };
        assert!(e.to_string().contains("qemu:dirty-bitmap:b1"), "{e}");
        let e = Error::Server {
            command: "NBD_CMD_READ",
            offset: 4096,
            len: 512,
            errno: 5,
            errno_name: errno_name(5),
            message: "Input/output error".into(),
        };
        assert_eq!(
            e.to_string(),
            "NBD server error on NBD_CMD_READ at offset 4096 (512 bytes): EIO (input/output error): Input/output error"
        );
        let e = Error::ExportNotFound { export: "x".into(), message: String::new() };
        assert_eq!(e.to_string(), "the NBD server has no export named \"x\"");
    }
}
