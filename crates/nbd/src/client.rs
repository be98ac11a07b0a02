//! The client: connect, read with many requests in flight, query block status, reconnect.

use std::time::Duration;

use crate::error::{Error, ProtocolError};
use crate::extent::{push_coalesced, BlockStatus, Extent};
use crate::handshake::{negotiate, ExportInfo};
use crate::inflight::{Engine, Piece, Target};
use crate::request::{check_range, pieces, Command, Request};
use crate::transport::{Connection, HandshakeStream, Stream};
use crate::uri::Uri;

/// How lost connections and transient server errors are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Reconnect attempts after a drop, and re-sends of a request that failed with `EIO`.
    /// A request outstanding across more drops than this is reported as lost. 0 disables.
    pub attempts: u32,
    /// Delay before the first attempt; doubled for each further attempt.
    pub initial_delay: Duration,
    /// Upper bound of the delay.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    /// 5 attempts, 100 ms doubling up to 2 s: about 4 s before giving up.
    fn default() -> Self {
        RetryPolicy { attempts: 5, initial_delay: Duration::from_millis(100), max_delay: Duration::from_secs(2) }
    }
}

impl RetryPolicy {
    /// No retries: every drop or server error is reported at once.
    pub fn none() -> Self {
        RetryPolicy { attempts: 0, ..RetryPolicy::default() }
    }

    /// The delay before attempt `n` (1-based).
    pub fn delay(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX);
        self.initial_delay.saturating_mul(factor).min(self.max_delay)
    }
}

/// How to connect and how hard to push.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Metadata contexts to negotiate, e.g. [`crate::BASE_ALLOCATION`] or
    /// [`crate::dirty_bitmap_context`]`("b0")`. Each must be granted or connecting fails.
    pub contexts: Vec<String>,
    /// Wire requests kept in flight by [`Client::reads`]; 1 means one at a time.
    pub depth: usize,
    /// Largest read request sent; larger ranges are split. Capped by the server's maximum
    /// block size and 32 MiB, rounded down to its minimum block size.
    pub request_size: u32,
    pub retry: RetryPolicy,
    pub connect_timeout: Duration,
    /// Bound on every socket read and write; a server silent for longer counts as a drop.
    pub io_timeout: Option<Duration>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            contexts: Vec::new(),
            depth: 16,
            request_size: 256 * 1024,
            retry: RetryPolicy::default(),
            connect_timeout: Duration::from_secs(10),
            io_timeout: Some(Duration::from_secs(120)),
        }
    }
}

/// A connection to one NBD export. Not shared between threads: one reader thread owns it
/// and keeps [`ClientOptions::depth`] requests in flight through [`Client::reads`].
#[derive(Debug)]
pub struct Client {
    uri: Uri,
    options: ClientOptions,
    info: ExportInfo,
    pub(crate) conn: Option<Connection>,
    next_cookie: u64,
    reconnects: u64,
}

impl Client {
    /// Connects to `uri` and negotiates the export and `options.contexts`.
    pub fn connect(uri: &Uri, options: ClientOptions) -> Result<Client, Error> {
        let (conn, info) = open(uri, &options)?;
        Ok(Client { uri: uri.clone(), options, info, conn: Some(conn), next_cookie: 1, reconnects: 0 })
    }

    /// What the handshake established (size, flags, block sizes, contexts).
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> u64 {
        self.info.size
    }

    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    /// How many times the connection was re-established.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// Reads `ranges` (`(offset, length)`) with up to `depth` requests in flight and yields
    /// each range's bytes, in the order of `ranges`. Ranges larger than the request size
    /// are split; runs of small contiguous ranges are coalesced into one request of up to
    /// the request size; either way each yielded buffer is exactly one range, filled
    /// straight from the socket. About `depth` × request size bytes are buffered at a time.
    /// After an error the iterator ends. Dropping it early discards the replies still due.
    pub fn reads<I>(&mut self, ranges: I) -> Reads<'_, I::IntoIter>
    where
        I: IntoIterator<Item = (u64, usize)>,
    {
        Reads {
            client: self,
            ranges: ranges.into_iter(),
            lookahead: None,
            engine: Engine::default(),
            queue: Default::default(),
            done: false,
        }
    }

    /// [`Client::reads`] with a callback: `f(offset, data)` for each range, in order.
    pub fn read_batch(&mut self, ranges: &[(u64, usize)], mut f: impl FnMut(u64, Vec<u8>)) -> Result<(), Error> {
        for r in self.reads(ranges.iter().copied()) {
            let (offset, data) = r?;
            f(offset, data);
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset` into a new buffer, split into requests in flight.
    pub fn read_vec(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, Error> {
        match self.reads([(offset, len)]).next() {
            Some(r) => r.map(|(_, data)| data),
            None => Ok(Vec::new()),
        }
    }

    /// Fills `buf` with the bytes at `offset`.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        let data = self.read_vec(offset, buf.len())?;
        buf.copy_from_slice(&data);
        Ok(())
    }

    /// One `NBD_CMD_BLOCK_STATUS` request: extents for every negotiated context, starting
    /// at `offset`, possibly describing less than `len` bytes.
    pub fn block_status(&mut self, offset: u64, len: u32) -> Result<BlockStatus, Error> {
        if self.info.contexts.is_empty() {
            return Err(Error::UnknownContext { context: "(none negotiated)".into() });
        }
        check_range(offset, len.into(), self.info.size, self.info.min_block())?;
        if len == 0 {
            return Ok(BlockStatus::default());
        }
        let mut engine = Engine::default();
        let op = engine.add_op(offset, 0, 1);
        let piece =
            Piece { command: Command::BlockStatus, offset, len, targets: vec![Target { op, start: 0, len: 0 }] };
        let result = (|| {
            engine.send(self, piece)?;
            engine.flush(self)?;
            loop {
                if let Some(op) = engine.pop_ready() {
                    return Ok(op.status);
                }
                engine.receive(self)?;
            }
        })();
        engine.drain(self);
        result
    }

    /// The extents of `context` covering exactly `[offset, offset + len)`, touching extents
    /// with equal flags merged. Loops over block status requests, since a server may
    /// answer each with less than was asked.
    pub fn extents(&mut self, context: &str, offset: u64, len: u64) -> Result<Vec<Extent>, Error> {
        if self.info.context_id(context).is_none() {
            return Err(Error::UnknownContext { context: context.into() });
        }
        check_range(offset, len, self.info.size, self.info.min_block())?;
        // 1 GiB per request (a multiple of any minimum block size).
        const STEP: u64 = 1 << 30;
        let end = offset + len;
        let mut pos = offset;
        let mut out = Vec::new();
        while pos < end {
            let status = self.block_status(pos, (end - pos).min(STEP) as u32)?;
            // Context ids may change across a reconnect: look the id up afresh.
            let id = self.info.context_id(context).ok_or_else(|| Error::UnknownContext { context: context.into() })?;
            // The reply parser guarantees a non-empty list for every context, from `pos`.
            let missing =
                || Error::Protocol { endpoint: self.endpoint_name(), source: ProtocolError::MissingContext(id) };
            let extents = status.extents(id).ok_or_else(missing)?;
            let last = extents.last().ok_or_else(missing)?;
            pos = last.end();
            for e in extents {
                push_coalesced(&mut out, *e);
            }
        }
        Ok(out)
    }

    /// Ends the session cleanly (`NBD_CMD_DISC`).
    pub fn close(mut self) -> Result<(), Error> {
        self.disconnect()
    }

    fn disconnect(&mut self) -> Result<(), Error> {
        if let Some(mut conn) = self.conn.take() {
            conn.queue(&Request::disconnect(0).encode());
            let r = conn.flush();
            conn.shutdown();
            r.map_err(|source| Error::ConnectionLost {
                endpoint: self.endpoint_name(),
                offset: 0,
                len: 0,
                attempts: 0,
                last: format!("sending NBD_CMD_DISC: {source}"),
            })?;
        }
        Ok(())
    }

    pub(crate) fn endpoint_name(&self) -> String {
        self.uri.endpoint.to_string()
    }

    pub(crate) fn next_cookie(&mut self) -> u64 {
        let c = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        c
    }

    pub(crate) fn context_ids(&self) -> Vec<u32> {
        self.info.contexts.iter().map(|c| c.id).collect()
    }

    /// The size of read requests: the option, within what the server accepts.
    fn request_size(&self) -> u32 {
        let min = self.info.min_block();
        let size = self.options.request_size.min(self.info.max_request());
        (size / min * min).max(min)
    }

    pub(crate) fn drop_connection(&mut self) {
        if let Some(conn) = self.conn.take() {
            conn.shutdown();
        }
    }

    /// Re-establishes the connection under the retry policy. `offset`/`len` name the
    /// request that needs it, for the error.
    /// `drops` counts the drops in a row so far: the back-off starts from there.
    pub(crate) fn reconnect(&mut self, offset: u64, len: u64, cause: String, drops: u32) -> Result<(), Error> {
        self.drop_connection();
        let attempts = self.options.retry.attempts;
        let mut last = cause;
        for n in 1..=attempts {
            std::thread::sleep(self.options.retry.delay(n + drops.max(1) - 1));
            match open(&self.uri, &self.options) {
                Ok((conn, info)) => {
                    if info.size != self.info.size {
                        return Err(Error::ExportResized {
                            export: self.uri.export.clone(),
                            was: self.info.size,
                            now: info.size,
                        });
                    }
                    self.info = info;
                    self.conn = Some(conn);
                    self.reconnects += 1;
                    return Ok(());
                }
                Err(e) if e.is_transient() => last = e.to_string(),
                Err(e) => return Err(e),
            }
        }
        Err(Error::ConnectionLost { endpoint: self.endpoint_name(), offset, len, attempts, last })
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.disconnect();
    }
}

fn open(uri: &Uri, options: &ClientOptions) -> Result<(Connection, ExportInfo), Error> {
    let endpoint = uri.endpoint.to_string();
    let stream = Stream::connect(&uri.endpoint, options.connect_timeout, options.io_timeout)
        .map_err(|source| Error::Connect { endpoint: endpoint.clone(), source })?;
    let mut conn = Connection::new(stream);
    match negotiate(&mut HandshakeStream(&mut conn.reader), &endpoint, &uri.export, &options.contexts) {
        Ok(info) => Ok((conn, info)),
        Err(e) => {
            conn.shutdown();
            Err(e)
        }
    }
}

/// The iterator of [`Client::reads`]: `(offset, data)` per range, in order.
pub struct Reads<'c, I: Iterator<Item = (u64, usize)>> {
    client: &'c mut Client,
    ranges: I,
    lookahead: Option<(u64, usize)>,
    engine: Engine,
    queue: std::collections::VecDeque<Piece>,
    done: bool,
}

impl<I: Iterator<Item = (u64, usize)>> Reads<'_, I> {
    fn next_range(&mut self) -> Option<(u64, usize)> {
        self.lookahead.take().or_else(|| self.ranges.next())
    }

    fn peek_range(&mut self) -> Option<(u64, usize)> {
        if self.lookahead.is_none() {
            self.lookahead = self.ranges.next();
        }
        self.lookahead
    }

    fn check(&self, offset: u64, len: usize) -> Result<(), Error> {
        check_range(offset, len as u64, self.client.info.size, self.client.info.min_block())
    }

    /// Turns the next range(s) into wire requests on the queue.
    fn plan(&mut self, offset: u64, len: usize, max: usize) -> Result<(), Error> {
        self.check(offset, len)?;
        if len > max {
            let split: Vec<_> = pieces(offset, len as u64, max as u32).collect();
            let op = self.engine.add_op(offset, len, split.len());
            for (o, l) in split {
                let target = Target { op, start: (o - offset) as usize, len: l as usize };
                self.queue.push_back(Piece { command: Command::Read, offset: o, len: l, targets: vec![target] });
            }
            return Ok(());
        }
        if len == 0 {
            self.engine.add_op(offset, 0, 0);
            return Ok(());
        }
        let mut targets = vec![Target { op: self.engine.add_op(offset, len, 1), start: 0, len }];
        let mut total = len;
        while let Some((o, l)) = self.peek_range() {
            if o != offset + total as u64 || l == 0 || total + l > max {
                break;
            }
            self.lookahead = None;
            self.check(o, l)?;
            targets.push(Target { op: self.engine.add_op(o, l, 1), start: 0, len: l });
            total += l;
        }
        self.queue.push_back(Piece { command: Command::Read, offset, len: total as u32, targets });
        Ok(())
    }

    fn step(&mut self) -> Result<Option<(u64, Vec<u8>)>, Error> {
        let depth = self.client.options.depth.max(1);
        let max = self.client.request_size() as usize;
        loop {
            if let Some(op) = self.engine.pop_ready() {
                return Ok(Some((op.offset, op.buf)));
            }
            while self.engine.in_flight() < depth {
                if let Some(piece) = self.queue.pop_front() {
                    self.engine.send(self.client, piece)?;
                    continue;
                }
                // Bound what waits to be taken: bytes, and (for tiny ranges) count.
                if self.engine.ops() > 0 && (self.engine.buffered() >= depth * max || self.engine.ops() >= 4096) {
                    break;
                }
                let Some((offset, len)) = self.next_range() else { break };
                self.plan(offset, len, max)?;
            }
            // Zero-length ranges need no request: ready as soon as those before them.
            if let Some(op) = self.engine.pop_ready() {
                return Ok(Some((op.offset, op.buf)));
            }
            if self.engine.in_flight() == 0 {
                // Nothing due and nothing ready: every range was delivered.
                return Ok(None);
            }
            self.engine.flush(self.client)?;
            self.engine.receive(self.client)?;
        }
    }
}

impl<I: Iterator<Item = (u64, usize)>> Iterator for Reads<'_, I> {
    type Item = Result<(u64, Vec<u8>), Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.step() {
            Ok(Some(x)) => Some(Ok(x)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                self.engine.drain(self.client);
                Some(Err(e))
            }
        }
    }
}

impl<I: Iterator<Item = (u64, usize)>> Drop for Reads<'_, I> {
    fn drop(&mut self) {
        self.engine.drain(self.client);
    }
}

#[cfg(test)]
mod tests;
