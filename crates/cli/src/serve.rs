//! `serve-nbd`: a snapshot's disks as read-only NBD exports, one per disk id.
//!
//! The NBD protocol is blockproof-nbd's ([`blockproof_nbd::serve`], one thread per client);
//! the bytes come from blockproof-core's [`DiskImage`] (verified, cached, shared by every
//! client of an export). This file only wires them: listener, exports, signals.
//!
//! - `--socket PATH` never replaces anything but a stale socket: an existing file that is
//!   not a socket, or a socket a live server answers on, is a usage error (exit 2).
//! - SIGINT (Ctrl-C) and SIGTERM stop the server: the socket file is removed, connected
//!   clients are disconnected, the S3 request counters are printed when
//!   `BLOCKPROOF_S3_STATS` is set, and the exit code is 0.

use std::io;
use std::net::TcpListener;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use blockproof_core::image::DEFAULT_CACHE_BYTES;
use blockproof_core::DiskImage;
use blockproof_nbd::{Export, Exports};
use blockproof_repo::BlobReader;

use crate::args::ServeArgs;
use crate::commands::open_repo;
use crate::Usage;

pub(crate) struct ImageExport<'a>(pub(crate) DiskImage<'a>);

impl Export for ImageExport<'_> {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.read_at(buf, offset).map_err(|e| {
            // The client gets EIO with this message; the operator should see it too.
            eprintln!("blockproof: error: {e}");
            io::Error::other(e.to_string())
        })
    }

    fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, bool)>> {
        self.0.allocation(offset, len).map_err(|e| io::Error::other(e.to_string()))
    }
}

enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

pub fn serve_nbd(a: ServeArgs) -> Result<u8> {
    if a.socket.is_some() == a.listen.is_some() {
        return Err(Usage("give exactly one of --socket PATH and --listen HOST:PORT".into()).into());
    }
    let cache = match a.cache_mib {
        None => DEFAULT_CACHE_BYTES,
        Some(m) => m.checked_mul(1 << 20).ok_or_else(|| Usage(format!("--cache-mib {m} is too large")))?,
    };
    // Blocked before anything starts a thread (the S3 client's runtime does, as the
    // repository opens): a thread started earlier would take SIGTERM by its default action
    // and leave the socket file behind.
    let signals = block_stop_signals()?;
    let socket_slot: Arc<Mutex<Option<PathBuf>>> = Arc::default();
    stop_on_signals(signals, socket_slot.clone());
    let repo = open_repo(&a.repo)?;
    let info = crate::commands::resolve_for_reading(&repo, &a.snapshot)?;
    if let Some(want) = &a.disk {
        if info.snapshot.disk(want).is_none() {
            let ids: Vec<_> = info.snapshot.disks.iter().map(|d| d.id.as_str()).collect();
            let msg = format!("snapshot {} has no disk {want:?} (it has: {})", info.id.short(), ids.join(", "));
            return Err(Usage(msg).into());
        }
    }
    let index = crate::commands::index_for_reading(&repo)?;
    let reader = BlobReader::new(&repo, &index);
    let mut exports: Exports<'_> = Vec::new();
    for d in &info.snapshot.disks {
        if a.disk.as_ref().is_some_and(|want| want != &d.id) {
            continue;
        }
        if !d.mismatches.is_empty() {
            let ranges: Vec<String> =
                d.mismatches.iter().take(4).map(|m| crate::commands::range_text(m.offset, m.length)).collect();
            eprintln!(
                "blockproof: warning: snapshot {} is tainted: disk {} differs from its source at bytes {}{}",
                info.id.short(),
                d.id,
                ranges.join(", "),
                if d.mismatches.len() > 4 { format!(" and {} more", d.mismatches.len() - 4) } else { String::new() }
            );
        }
        exports.push((d.id.clone(), Arc::new(ImageExport(DiskImage::new(&reader, d, cache)?))));
    }
    let names: Vec<&str> = exports.iter().map(|(n, _)| n.as_str()).collect();
    let listener = match (&a.socket, &a.listen) {
        (Some(path), _) => {
            // Bound and handed to the signal thread under one lock: from here on the
            // socket file is ours, removed on SIGINT/SIGTERM, and no signal finds it
            // without its owner.
            let mut slot = lock_slot(&socket_slot);
            let l = bind_unix(path)?;
            *slot = Some(path.clone());
            Listener::Unix(l, path.clone())
        }
        (_, Some(addr)) => Listener::Tcp(TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?),
        (None, None) => unreachable!("checked above"),
    };
    let place = match &listener {
        Listener::Unix(_, path) => format!("nbd+unix:///EXPORT?socket={}", path.display()),
        Listener::Tcp(l) => {
            let addr = l.local_addr()?;
            if !addr.ip().is_loopback() {
                eprintln!(
                    "blockproof: warning: {addr} is reachable from other machines; NBD has no authentication \
                     and no encryption: anyone who can connect can read these disks"
                );
            }
            format!("nbd://{addr}/EXPORT")
        }
    };
    eprintln!("serving snapshot {} read-only: exports {} on {place} (Ctrl-C stops)", info.id.short(), names.join(", "));
    std::thread::scope(|s| -> Result<u8> {
        loop {
            let exports = &exports;
            let accepted = match &listener {
                Listener::Unix(l, _) => l.accept().map(|(stream, _)| {
                    s.spawn(move || session(stream, exports));
                }),
                Listener::Tcp(l) => l.accept().map(|(stream, _)| {
                    let _ = stream.set_nodelay(true);
                    s.spawn(move || session(stream, exports));
                }),
            };
            if let Err(e) = accepted {
                // Out of file descriptors, a client gone before it was accepted: not fatal.
                eprintln!("blockproof: warning: accepting a connection failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    })
}

/// Serves one client; its errors end its session only. A client that simply went away
/// (a probe that connects and closes, a killed qemu) is not reported.
fn session<S: io::Read + io::Write>(mut stream: S, exports: &Exports<'_>) {
    match blockproof_nbd::serve(&mut stream, exports) {
        Ok(()) => {}
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ) => {}
        Err(e) => eprintln!("blockproof: nbd client dropped: {e}"),
    }
}

/// Binds a unix socket at `path`, replacing only a stale socket.
fn bind_unix(path: &Path) -> Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(Usage(format!("{} exists and is not a socket; refusing to replace it", path.display())).into())
        }
        Ok(_) if UnixStream::connect(path).is_ok() => {
            return Err(Usage(format!("a server is already listening on {}", path.display())).into())
        }
        Ok(_) => std::fs::remove_file(path).with_context(|| format!("cannot remove the stale {}", path.display()))?,
        Err(_) => {}
    }
    UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))
}

fn lock_slot(slot: &Mutex<Option<PathBuf>>) -> std::sync::MutexGuard<'_, Option<PathBuf>> {
    slot.lock().unwrap_or_else(|e| e.into_inner())
}

/// Blocks SIGINT and SIGTERM in this thread and so in every thread it starts later (all
/// client threads), to be taken by [`stop_on_signals`] (or `mount`'s own taker).
pub(crate) fn block_stop_signals() -> Result<libc::sigset_t> {
    // SAFETY: plain libc calls on a local, initialised signal set; no memory is shared
    // with a signal handler (the signals are taken synchronously by sigwait).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc)).context("cannot block SIGINT and SIGTERM");
        }
        Ok(set)
    }
}

/// Takes SIGINT and SIGTERM (blocked by [`block_stop_signals`]) on a thread of their own:
/// removes the socket and exits 0.
fn stop_on_signals(set: libc::sigset_t, socket: Arc<Mutex<Option<PathBuf>>>) {
    std::thread::spawn(move || {
        let mut signal = 0;
        // SAFETY: `set` is initialised and blocked in every thread of this process.
        let rc = unsafe { libc::sigwait(&set, &mut signal) };
        // Held until the exit: a socket being bound now is not left behind.
        let slot = lock_slot(&socket);
        if let Some(path) = &*slot {
            let _ = std::fs::remove_file(path);
        }
        let name = if signal == libc::SIGTERM { "SIGTERM" } else { "SIGINT" };
        if rc == 0 {
            eprintln!("serve-nbd stopped ({name}); clients disconnected");
        }
        // What every other command prints as it returns (BLOCKPROOF_S3_STATS).
        crate::location::report_requests();
        std::process::exit(crate::exit::OK.into());
    });
}
