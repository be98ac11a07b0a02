//! Transmission-phase requests: the 28-byte request header, and how a caller's range is cut
//! into requests the server accepts.
//!
//! ```text
//! C: 32 bits  0x25609513 (NBD_REQUEST_MAGIC)
//! C: 16 bits  command flags
//! C: 16 bits  type (NBD_CMD_*)
//! C: 64 bits  cookie (the reply carries it back)
//! C: 64 bits  offset
//! C: 32 bits  length
//! ```

use crate::error::Error;

pub(crate) const REQUEST_MAGIC: u32 = 0x2560_9513;

/// The encoded size of a request header.
pub(crate) const REQUEST_LEN: usize = 28;

/// The commands this read-only client sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Command {
    Read,
    Disconnect,
    BlockStatus,
}

impl Command {
    fn code(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Disconnect => 2,
            Command::BlockStatus => 7,
        }
    }

    /// The protocol's name, for messages.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Command::Read => "NBD_CMD_READ",
            Command::Disconnect => "NBD_CMD_DISC",
            Command::BlockStatus => "NBD_CMD_BLOCK_STATUS",
        }
    }
}

/// One request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Request {
    pub(crate) command: Command,
    pub(crate) flags: u16,
    pub(crate) cookie: u64,
    pub(crate) offset: u64,
    pub(crate) length: u32,
}

impl Request {
    pub(crate) fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.code().to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// `NBD_CMD_DISC`: offset and length must be zero, and there is no reply.
    pub(crate) fn disconnect(cookie: u64) -> Request {
        Request { command: Command::Disconnect, flags: 0, cookie, offset: 0, length: 0 }
    }
}

/// Checks a caller's range against the export: inside it, and aligned to the minimum block
/// size (the last partial block of an export whose size is not a multiple is allowed).
pub(crate) fn check_range(offset: u64, len: u64, size: u64, min_block: u32) -> Result<(), Error> {
    let end = offset.checked_add(len).ok_or(Error::OutOfRange { offset, len, size })?;
    if end > size {
        return Err(Error::OutOfRange { offset, len, size });
    }
    let min = u64::from(min_block);
    if !offset.is_multiple_of(min) || (!len.is_multiple_of(min) && end != size) {
        return Err(Error::Unaligned { offset, len, min_block });
    }
    Ok(())
}

/// Cuts `[offset, offset + len)` into pieces of at most `max` bytes: `(offset, length)`.
/// `max` is a multiple of the minimum block size, so every piece but the last stays aligned.
pub(crate) fn pieces(offset: u64, len: u64, max: u32) -> impl Iterator<Item = (u64, u32)> {
    let max = u64::from(max.max(1));
    let count = len.div_ceil(max);
    (0..count).map(move |i| {
        let start = offset + i * max;
        let this = (len - i * max).min(max);
        (start, this as u32)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_big_endian() {
        let r = Request {
            command: Command::BlockStatus,
            flags: 0,
            cookie: 0x0102030405060708,
            offset: 1 << 40,
            length: 4096,
        };
        let b = r.encode();
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&b[4..8], &[0, 0, 0, 7]);
        assert_eq!(&b[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&b[16..24], &[0, 0, 1, 0, 0, 0, 0, 0]);
        assert_eq!(&b[24..28], &[0, 0, 0x10, 0]);
        let d = Request::disconnect(9).encode();
        assert_eq!(&d[6..8], &[0, 2]);
        assert_eq!(&d[16..28], &[0; 12]);
    }

    #[test]
    fn ranges_are_checked() {
        assert!(check_range(0, 4096, 4096, 512).is_ok());
        assert!(check_range(4096, 0, 4096, 512).is_ok());
        assert!(matches!(check_range(512, 4096, 4096, 512), Err(Error::OutOfRange { .. })));
        assert!(matches!(check_range(u64::MAX, 2, 4096, 1), Err(Error::OutOfRange { .. })));
        assert!(matches!(check_range(100, 512, 4096, 512), Err(Error::Unaligned { .. })));
        assert!(matches!(check_range(0, 100, 4096, 512), Err(Error::Unaligned { .. })));
        // The tail of an export whose size is not a block multiple is readable.
        assert!(check_range(4096, 100, 4196, 512).is_ok());
    }

    #[test]
    fn pieces_cover_the_range_exactly() {
        let p: Vec<_> = pieces(1000, 70 << 20, 32 << 20).collect();
        assert_eq!(p, vec![(1000, 32 << 20), (1000 + (32 << 20), 32 << 20), (1000 + (64 << 20), 6 << 20)]);
        assert_eq!(pieces(5, 0, 4096).count(), 0);
        assert_eq!(pieces(0, 4096, 4096).collect::<Vec<_>>(), vec![(0, 4096)]);
        let mut x = 12345u64;
        for _ in 0..500 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let (off, len, max) = (x >> 40, (x >> 8) & 0xff_ffff, ((x & 0xff) as u32 + 1) * 512);
            let mut pos = off;
            for (o, l) in pieces(off, len, max) {
                assert_eq!(o, pos);
                assert!(l > 0 && l <= max);
                pos += u64::from(l);
            }
            assert_eq!(pos, off + len);
        }
    }
}
