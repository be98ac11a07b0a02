//! # blockproof-nbd
//!
//! A synchronous, pure-Rust NBD client for reading VM disks (and, in [`serve`], a small
//! read-only NBD server for exporting backups): what blockproof uses to read
//! an export of qemu-nbd, libvirt's `backup-begin` pull mode or any NBD server, together
//! with its allocation map (`base:allocation`) and its changed-block map (a qemu dirty
//! bitmap, `qemu:dirty-bitmap:NAME`).
//!
//! ## Model
//!
//! A [`Client`] owns one connection and is driven by one thread; there is no async runtime
//! and no background thread. Throughput comes from pipelining: [`Client::reads`] keeps up to
//! [`ClientOptions::depth`] requests in flight on the socket, reads replies as they arrive
//! (in any order, chunks of different replies interleaved), writes each reply's data
//! straight into the buffer of the range it belongs to, and yields the ranges in the order
//! they were asked for. Ranges larger than [`ClientOptions::request_size`] are split; runs
//! of small contiguous ranges (64 KiB chunks) are coalesced into one request, their data
//! scattered into each range's own buffer. Over a unix socket to qemu-nbd this reads about
//! twice as fast as one request at a time.
//!
//! ```no_run
//! use blockproof_nbd::{dirty_bitmap_context, ranges_where, Client, ClientOptions, Extent, Uri, BASE_ALLOCATION};
//!
//! let uri: Uri = "nbd+unix:///disk0?socket=/run/disk0.sock".parse()?;
//! let bitmap = dirty_bitmap_context("nightly");
//! let options = ClientOptions { contexts: vec![BASE_ALLOCATION.into(), bitmap.clone()], ..ClientOptions::default() };
//! let mut client = Client::connect(&uri, options)?;
//! let size = client.size();
//! let dirty = ranges_where(&client.extents(&bitmap, 0, size)?, Extent::is_dirty);
//! // Read the dirty ranges in 64 KiB chunks.
//! const CHUNK: u64 = 64 * 1024;
//! let chunks = dirty.into_iter().flat_map(|(offset, len)| {
//!     (offset..offset + len).step_by(CHUNK as usize).map(move |o| (o, (offset + len - o).min(CHUNK) as usize))
//! });
//! for r in client.reads(chunks) {
//!     let (offset, data) = r?;
//!     // store `data`, the bytes at `offset`
//! #   let _ = (offset, data);
//! }
//! client.close()?;
//! # Ok::<(), blockproof_nbd::Error>(())
//! ```
//!
//! ## Supported
//!
//! - Fixed newstyle negotiation (`NBD_FLAG_FIXED_NEWSTYLE`, `NBD_FLAG_NO_ZEROES`);
//!   `NBD_OPT_STRUCTURED_REPLY`; `NBD_OPT_SET_META_CONTEXT`; `NBD_OPT_GO` with
//!   `NBD_INFO_EXPORT` and `NBD_INFO_BLOCK_SIZE`, falling back to `NBD_OPT_EXPORT_NAME`
//!   for servers without `NBD_OPT_GO`. Oldstyle servers and TLS are refused with a clear
//!   error; extended headers (64-bit lengths) are not negotiated.
//! - `NBD_CMD_READ` with structured replies (data, holes, errors with or without offset)
//!   or simple replies when the server has no structured replies; `NBD_CMD_BLOCK_STATUS`;
//!   `NBD_CMD_DISC` on close. No writes: the client is read-only by construction.
//! - TCP and unix-domain sockets, from `nbd://HOST[:PORT]/EXPORT` and
//!   `nbd+unix:///EXPORT?socket=PATH` URIs ([`Uri`]).
//!
//! ## Invariants
//!
//! - Nothing from the server is trusted. Every reply is checked against the request it
//!   answers (cookie in flight, chunk type valid for the command, content inside the
//!   request, no overlap, complete before the final chunk, one block status chunk per
//!   context) and every length is bounded before anything is read or allocated. A
//!   violation is a typed [`ProtocolError`] and a dropped connection — never a panic, never
//!   wrong bytes handed back.
//! - A read either yields every byte of its range or fails naming the range; holes are
//!   zeroes. Requests never exceed the server's maximum block size (nor 32 MiB) and
//!   respect its minimum block size; larger ranges are split.
//! - Requested metadata contexts must all be granted: a missing dirty bitmap is
//!   [`Error::BitmapNotFound`], which a caller turns into "read everything".
//! - A dropped connection is re-established under the [`RetryPolicy`] (bounded
//!   exponential back-off), every request in flight is sent again, and the export must
//!   still have the same size ([`Error::ExportResized`] otherwise). A request that stays
//!   outstanding across more drops than the policy allows — e.g. qemu-nbd dropping the
//!   client on a persistent read error — ends in [`Error::ConnectionLost`] naming its
//!   offset. `EIO` answers are re-sent the same number of times, then [`Error::Server`].
//! - The client never writes to the export.
//! - [`Client::connect`] itself does not retry: a missing socket or a refused connection
//!   is reported at once ([`Error::Connect`]); only an established session reconnects.

mod client;
mod error;
mod extent;
mod handshake;
mod inflight;
mod reply;
mod request;
mod server;
mod transport;
mod uri;

pub use client::{Client, ClientOptions, Reads, RetryPolicy};
pub use error::{errno_name, Error, ProtocolError};
pub use extent::{
    dirty_bitmap_context, ranges_where, BlockStatus, Extent, BASE_ALLOCATION, STATE_DIRTY, STATE_HOLE, STATE_ZERO,
};
pub use handshake::{BlockSize, ExportInfo, MetaContext, FLAG_CAN_MULTI_CONN, FLAG_READ_ONLY, MAX_REQUEST};
pub use server::{serve, Export, Exports};
pub use uri::{Endpoint, Uri, UriError, DEFAULT_PORT};
