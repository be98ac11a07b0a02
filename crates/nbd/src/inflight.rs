//! The requests in flight on one client, and what happens to them when things go wrong.
//!
//! An *operation* is what a caller asked for (a range to read, one block status query). A
//! large one is cut into wire requests of at most the request size; small contiguous ones
//! are coalesced into one wire request (per-request cost dominates at 64 KiB). Each wire
//! request has a fresh cookie, and its data goes straight into the operations' buffers.
//! Operations complete in any order on the wire but are handed back in the order they were
//! added.
//!
//! Failure handling, per wire request:
//!
//! - the server reports `EIO` (or `ENOMEM`): the request is sent again after a back-off
//!   delay, up to the retry policy's attempts, then [`Error::Server`];
//! - the connection drops (end of file, reset, timeout, `ESHUTDOWN`): the client
//!   reconnects with back-off and re-sends every request in flight under new cookies. A
//!   request that was in flight across more drops than the policy's attempts is reported
//!   as [`Error::ConnectionLost`] with its offset — this is how a server that drops the
//!   connection on a persistent read error is told apart from a transient outage;
//! - the server breaks the protocol: the connection is dropped, [`Error::Protocol`].

use std::collections::{HashMap, VecDeque};
use std::io;

use crate::client::Client;
use crate::error::{errno_name, Error};
use crate::extent::BlockStatus;
use crate::reply::{read_reply, Inflight, Pending, ReplyError};
use crate::request::{Command, Request};

const EIO: u32 = 5;
const ENOMEM: u32 = 12;
const ESHUTDOWN: u32 = 108;

/// Where part of a wire request's data goes: `len` bytes at `start` in operation `op`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) op: u64,
    pub(crate) start: usize,
    pub(crate) len: usize,
}

/// A wire request to send. A read's `targets` are consecutive and their lengths add up to
/// `len`: one target when a large range is split, several when small contiguous ranges are
/// coalesced into one request. A block status names its operation with one empty target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Piece {
    pub(crate) command: Command,
    pub(crate) offset: u64,
    pub(crate) len: u32,
    pub(crate) targets: Vec<Target>,
}

/// A wire request in flight.
#[derive(Debug)]
struct Slot {
    piece: Piece,
    pending: Pending,
    /// Connection drops while this request was outstanding.
    lost: u32,
    /// Server errors returned for it.
    failures: u32,
}

/// A caller's operation.
#[derive(Debug)]
pub(crate) struct Op {
    pub(crate) offset: u64,
    pub(crate) buf: Vec<u8>,
    pub(crate) status: BlockStatus,
    remaining: usize,
}

#[derive(Debug, Default)]
pub(crate) struct Engine {
    slots: HashMap<u64, Slot>,
    ops: VecDeque<Op>,
    first_op: u64,
    buffered: usize,
}

impl Inflight for Engine {
    fn pending(&mut self, cookie: u64) -> Option<&mut Pending> {
        self.slots.get_mut(&cookie).map(|s| &mut s.pending)
    }

    fn fill(
        &mut self,
        cookie: u64,
        at: usize,
        len: usize,
        f: &mut dyn FnMut(&mut [u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let internal = || io::Error::other("internal error: no buffer for reply data");
        let slot = self.slots.get(&cookie).ok_or_else(internal)?;
        let end = at + len;
        let mut pos = 0;
        for t in &slot.piece.targets {
            let (t_start, t_end) = (pos, pos + t.len);
            pos = t_end;
            let (lo, hi) = (at.max(t_start), end.min(t_end));
            if lo >= hi {
                continue;
            }
            let index = usize::try_from(t.op - self.first_op).map_err(|_| internal())?;
            let op = self.ops.get_mut(index).ok_or_else(internal)?;
            let buf = op.buf.get_mut(t.start + (lo - t_start)..t.start + (hi - t_start)).ok_or_else(internal)?;
            f(buf)?;
        }
        Ok(())
    }
}

impl Engine {
    /// Adds an operation of `buf_len` bytes to be delivered by `pieces` wire requests.
    pub(crate) fn add_op(&mut self, offset: u64, buf_len: usize, pieces: usize) -> u64 {
        let seq = self.first_op + self.ops.len() as u64;
        self.ops.push_back(Op { offset, buf: vec![0u8; buf_len], status: BlockStatus::default(), remaining: pieces });
        self.buffered += buf_len;
        seq
    }

    /// Bytes of operations added and not yet taken.
    pub(crate) fn buffered(&self) -> usize {
        self.buffered
    }

    /// Operations added and not yet taken.
    pub(crate) fn ops(&self) -> usize {
        self.ops.len()
    }

    /// Wire requests in flight.
    pub(crate) fn in_flight(&self) -> usize {
        self.slots.len()
    }

    /// The first operation, if all its requests are done.
    pub(crate) fn pop_ready(&mut self) -> Option<Op> {
        if self.ops.front()?.remaining > 0 {
            return None;
        }
        self.first_op += 1;
        let op = self.ops.pop_front()?;
        self.buffered -= op.buf.len();
        Some(op)
    }

    /// Queues a wire request (sent on [`Engine::flush`]).
    pub(crate) fn send(&mut self, client: &mut Client, piece: Piece) -> Result<(), Error> {
        if client.conn.is_none() {
            let cause = io::Error::new(io::ErrorKind::NotConnected, "not connected");
            client.reconnect(piece.offset, u64::from(piece.len), cause.to_string(), 1)?;
        }
        self.queue(client, Slot { piece, pending: Pending::read(0, 0), lost: 0, failures: 0 });
        Ok(())
    }

    fn queue(&mut self, client: &mut Client, mut slot: Slot) {
        let p = &slot.piece;
        slot.pending = match p.command {
            Command::BlockStatus => Pending::block_status(p.offset, p.len, client.context_ids()),
            _ => Pending::read(p.offset, p.len),
        };
        let cookie = client.next_cookie();
        let req = Request { command: p.command, flags: 0, cookie, offset: p.offset, length: p.len };
        if let Some(conn) = client.conn.as_mut() {
            conn.queue(&req.encode());
        }
        self.slots.insert(cookie, slot);
    }

    /// Sends what was queued; a failed write is a dropped connection.
    pub(crate) fn flush(&mut self, client: &mut Client) -> Result<(), Error> {
        let result = match client.conn.as_mut() {
            Some(conn) => conn.flush(),
            None => Err(io::Error::new(io::ErrorKind::NotConnected, "not connected")),
        };
        match result {
            Ok(()) => Ok(()),
            Err(e) => self.recover(client, e),
        }
    }

    /// Reads one reply message and acts on it.
    pub(crate) fn receive(&mut self, client: &mut Client) -> Result<(), Error> {
        let structured = client.info().structured_replies;
        let Some(conn) = client.conn.as_mut() else {
            return self.recover(client, io::Error::new(io::ErrorKind::NotConnected, "not connected"));
        };
        let received = match read_reply(&mut conn.reader, structured, self) {
            Ok(r) => r,
            Err(ReplyError::Io(e)) => return self.recover(client, e),
            Err(ReplyError::Protocol(source)) => {
                client.drop_connection();
                self.slots.clear();
                return Err(Error::Protocol { endpoint: client.endpoint_name(), source });
            }
        };
        if !received.done {
            return Ok(());
        }
        let Some(mut slot) = self.slots.remove(&received.cookie) else { return Ok(()) };
        match slot.pending.error.take() {
            None => {
                for t in &slot.piece.targets {
                    if let Some(op) = self.ops.get_mut((t.op - self.first_op) as usize) {
                        op.remaining -= 1;
                        op.status.contexts.append(&mut slot.pending.extents);
                    }
                }
                Ok(())
            }
            Some(e) if e.errno == ESHUTDOWN => {
                // The server is going away: treat as a dropped connection.
                self.slots.insert(received.cookie, slot);
                let msg = format!("server shutting down: {}", e.message);
                self.recover(client, io::Error::new(io::ErrorKind::ConnectionAborted, msg))
            }
            Some(e) => {
                slot.failures += 1;
                let retry = client.options().retry;
                if !(e.errno == EIO || e.errno == ENOMEM) || slot.failures > retry.attempts {
                    return Err(Error::Server {
                        command: slot.piece.command.name(),
                        offset: e.offset.unwrap_or(slot.piece.offset),
                        len: u64::from(slot.piece.len),
                        errno: e.errno,
                        errno_name: errno_name(e.errno),
                        message: e.message,
                    });
                }
                std::thread::sleep(retry.delay(slot.failures));
                self.queue(client, slot);
                self.flush(client)
            }
        }
    }

    /// The connection is gone: reconnect and send every request in flight again.
    fn recover(&mut self, client: &mut Client, cause: io::Error) -> Result<(), Error> {
        let mut cause = describe(&cause);
        loop {
            client.drop_connection();
            let attempts = client.options().retry.attempts;
            for slot in self.slots.values_mut() {
                slot.lost += 1;
            }
            let first = self.slots.values().min_by_key(|s| s.piece.offset).map(|s| (s.piece.offset, s.piece.len));
            let worst = self.slots.values().filter(|s| s.lost > attempts).min_by_key(|s| s.piece.offset);
            if let Some(s) = worst {
                let (offset, len, lost) = (s.piece.offset, u64::from(s.piece.len), s.lost);
                self.slots.clear();
                return Err(Error::ConnectionLost {
                    endpoint: client.endpoint_name(),
                    offset,
                    len,
                    attempts: lost,
                    last: format!("the connection dropped {lost} times while this request was outstanding ({cause})"),
                });
            }
            let (offset, len) = first.map_or((0, 0), |(o, l)| (o, u64::from(l)));
            // Repeated drops of the same requests back off further each time.
            let drops = self.slots.values().map(|s| s.lost).max().unwrap_or(1);
            if let Err(e) = client.reconnect(offset, len, cause.clone(), drops) {
                self.slots.clear();
                return Err(e);
            }
            let slots: Vec<Slot> = self.slots.drain().map(|(_, s)| s).collect();
            for slot in slots {
                self.queue(client, slot);
            }
            match client.conn.as_mut().map(|c| c.flush()) {
                Some(Ok(())) => return Ok(()),
                Some(Err(e)) => cause = describe(&e),
                None => cause = "not connected".into(),
            }
        }
    }

    /// Reads and discards the replies still due, so the connection can be used again. On
    /// any trouble the connection is dropped instead (the next request reconnects).
    pub(crate) fn drain(&mut self, client: &mut Client) {
        let structured = client.info().structured_replies;
        while !self.slots.is_empty() {
            let Some(conn) = client.conn.as_mut() else { break };
            match read_reply(&mut conn.reader, structured, self) {
                Ok(r) if r.done => {
                    self.slots.remove(&r.cookie);
                }
                Ok(_) => {}
                Err(_) => {
                    client.drop_connection();
                    break;
                }
            }
        }
        self.slots.clear();
    }
}

fn describe(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => "the server closed the connection".into(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!("no answer within the I/O timeout ({e})"),
        _ => e.to_string(),
    }
}
