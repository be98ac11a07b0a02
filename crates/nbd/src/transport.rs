//! The byte stream under the protocol: a TCP or unix-domain socket, with timeouts.
//!
//! Reads go through a `BufReader` (small headers, large payloads bypass its buffer);
//! requests are collected in an output buffer and written in one `write_all` per burst, so a
//! window of requests costs one system call.

use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::uri::Endpoint;

/// A connected socket.
#[derive(Debug)]
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    /// Connects to `endpoint`. `io_timeout` bounds every later read and write, so a server
    /// that hangs is treated like one that dropped the connection.
    pub(crate) fn connect(
        endpoint: &Endpoint,
        connect_timeout: Duration,
        io_timeout: Option<Duration>,
    ) -> io::Result<Stream> {
        let stream = match endpoint {
            Endpoint::Unix(path) => Stream::Unix(UnixStream::connect(path)?),
            Endpoint::Tcp { host, port } => {
                let mut last = None;
                let mut connected = None;
                for addr in (host.as_str(), *port).to_socket_addrs()? {
                    match TcpStream::connect_timeout(&addr, connect_timeout) {
                        Ok(s) => {
                            connected = Some(s);
                            break;
                        }
                        Err(e) => last = Some(e),
                    }
                }
                let s = match connected {
                    Some(s) => s,
                    None => {
                        return Err(last.unwrap_or_else(|| {
                            io::Error::new(io::ErrorKind::NotFound, format!("{host} resolves to no address"))
                        }))
                    }
                };
                // The protocol asks both ends to disable Nagle: requests are small and a
                // delayed request stalls the whole window.
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
        };
        stream.set_timeouts(io_timeout)?;
        Ok(stream)
    }

    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }

    /// Closes both directions; a blocked peer sees end-of-file. Errors are irrelevant here.
    pub(crate) fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A negotiated connection in the transmission phase.
#[derive(Debug)]
pub(crate) struct Connection {
    pub(crate) reader: BufReader<Stream>,
    out: Vec<u8>,
}

impl Connection {
    pub(crate) fn new(stream: Stream) -> Connection {
        Connection { reader: BufReader::with_capacity(64 * 1024, stream), out: Vec::with_capacity(1024) }
    }

    /// Queues encoded bytes; [`Connection::flush`] sends them.
    pub(crate) fn queue(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    /// Sends everything queued.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let result = self.reader.get_mut().write_all(&self.out);
        self.out.clear();
        result
    }

    pub(crate) fn shutdown(&self) {
        self.reader.get_ref().shutdown();
    }
}

/// A `Read + Write` view of a stream with buffered reads, for the handshake.
pub(crate) struct HandshakeStream<'a>(pub(crate) &'a mut BufReader<Stream>);

impl Read for HandshakeStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for HandshakeStream<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.get_mut().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn unix_and_tcp_connect_and_carry_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"hello").unwrap();
        });
        let s = Stream::connect(&Endpoint::Unix(path), Duration::from_secs(5), Some(Duration::from_secs(5))).unwrap();
        let mut c = Connection::new(s);
        let mut buf = [0u8; 5];
        c.reader.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        t.join().unwrap();

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 3];
            s.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"abc");
        });
        let ep = Endpoint::Tcp { host: "127.0.0.1".into(), port };
        let mut c = Connection::new(Stream::connect(&ep, Duration::from_secs(5), None).unwrap());
        c.queue(b"ab");
        c.queue(b"c");
        c.flush().unwrap();
        t.join().unwrap();
    }

    #[test]
    fn missing_socket_is_an_error() {
        let e = Stream::connect(&Endpoint::Unix("/nonexistent/x.sock".into()), Duration::from_secs(1), None);
        assert!(e.is_err());
    }
}
