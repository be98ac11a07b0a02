//! The restore point's disks served to the VM: a read-only NBD server
//! ([`blockproof_nbd::serve`]) on a unix socket in the test's private directory, one
//! thread per connection (QEMU opens one per overlay's backing file).
//!
//! [`ExportServer::run`] is the accept loop, on a scoped thread of the caller;
//! [`ExportServer::stop`] ends it from another thread and shuts every open connection
//! down, so every thread has returned once the caller's scope ends, even if a client
//! never hangs up.

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use blockproof_nbd::Exports;

pub(crate) struct ExportServer {
    path: PathBuf,
    listener: UnixListener,
    stopped: AtomicBool,
    /// A handle on each accepted connection, to shut it down at the stop.
    connections: Mutex<Vec<UnixStream>>,
}

impl ExportServer {
    pub(crate) fn bind(path: &Path) -> io::Result<ExportServer> {
        Ok(ExportServer {
            path: path.to_path_buf(),
            listener: UnixListener::bind(path)?,
            stopped: AtomicBool::new(false),
            connections: Mutex::new(Vec::new()),
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts connections and serves each on a thread of its own until [`stop`](Self::stop);
    /// returns once every connection's thread has returned.
    pub(crate) fn run(&self, exports: &Exports<'_>) {
        std::thread::scope(|s| {
            for stream in self.listener.incoming() {
                if self.stopped.load(Ordering::SeqCst) {
                    break;
                }
                let stream = match stream {
                    Ok(stream) => stream,
                    // A client gone before it was accepted, out of descriptors: not fatal.
                    Err(_) => continue,
                };
                match stream.try_clone() {
                    Ok(handle) => self.lock().push(handle),
                    // Without a handle it could not be shut down at the stop: refuse it.
                    Err(_) => continue,
                }
                // Checked again under the lock's order: a stop that ran between the
                // accept and the push did not see this connection.
                if self.stopped.load(Ordering::SeqCst) {
                    let _ = stream.shutdown(std::net::Shutdown::Both);
                    break;
                }
                s.spawn(move || {
                    let mut stream = stream;
                    // QEMU going away (quit, killed) ends the session with an error
                    // that says nothing about the backup; a damaged chunk has been
                    // reported by the export itself.
                    let _ = blockproof_nbd::serve(&mut stream, exports);
                });
            }
        });
    }

    /// Ends [`run`](Self::run): no new connection is served and every open one is shut
    /// down (its thread sees the end of its stream).
    pub(crate) fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        // Wakes the accept loop; it sees the flag and returns.
        let _ = UnixStream::connect(&self.path);
        for c in self.lock().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<UnixStream>> {
        self.connections.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Stops the server as the scope it runs in ends, even on a panic (the scope would wait
/// for it).
pub(crate) struct StopServer<'a>(pub(crate) &'a ExportServer);

impl Drop for StopServer<'_> {
    fn drop(&mut self) {
        self.0.stop();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use blockproof_nbd::{Client, ClientOptions, Export, Uri};

    use super::*;

    struct Pattern;

    impl Export for Pattern {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = ((offset + i as u64) % 251) as u8;
            }
            Ok(())
        }
        fn allocation(&self, _offset: u64, len: u64) -> io::Result<Vec<(u64, bool)>> {
            Ok(vec![(len, false)])
        }
    }

    #[test]
    fn serves_the_exports_and_stop_ends_every_thread_even_with_a_client_still_connected() {
        let dir = tempfile::tempdir().unwrap();
        let server = ExportServer::bind(&dir.path().join("nbd.sock")).unwrap();
        let exports: Exports<'_> = vec![("sda".into(), Arc::new(Pattern))];
        std::thread::scope(|s| {
            s.spawn(|| server.run(&exports));
            let uri: Uri = format!("nbd+unix:///sda?socket={}", server.path().display()).parse().unwrap();
            let mut client = Client::connect(&uri, ClientOptions::default()).unwrap();
            assert_eq!(client.size(), 1 << 20);
            assert_eq!(client.read_vec(1000, 512).unwrap()[0], (1000 % 251) as u8);
            // The client stays connected: stop must still end the session's thread.
            server.stop();
            drop(client);
        });
    }
}
