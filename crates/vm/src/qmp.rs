//! The little of QMP (the QEMU Machine Protocol) a boot test needs: ask QEMU to quit.
//!
//! One JSON object per line each way: the server greets (`{"QMP": ...}`), the client
//! sends `qmp_capabilities`, then commands; each command is answered by a `return` or an
//! `error` object, with asynchronous events (`{"event": ...}`) possibly in between.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

/// Connects to QEMU's QMP socket and asks it to quit. Every read and write gives up
/// after `timeout` (a hung QEMU is then killed by the caller).
pub(crate) fn quit(socket: &Path, timeout: Duration) -> io::Result<()> {
    let stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let greeting = read_object(&mut reader)?;
    if greeting.get("QMP").is_none() {
        return Err(io::Error::other(format!("not a QMP greeting: {greeting}")));
    }
    let mut writer = stream;
    execute(&mut reader, &mut writer, "qmp_capabilities")?;
    match execute(&mut reader, &mut writer, "quit") {
        Ok(()) => Ok(()),
        // QEMU may close the socket before its answer reaches us: it is quitting.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(()),
        Err(e) => Err(e),
    }
}

fn execute(reader: &mut impl BufRead, writer: &mut impl Write, command: &str) -> io::Result<()> {
    writeln!(writer, "{}", serde_json::json!({ "execute": command }))?;
    writer.flush()?;
    loop {
        let reply = read_object(reader)?;
        if reply.get("return").is_some() {
            return Ok(());
        }
        if let Some(e) = reply.get("error") {
            return Err(io::Error::other(format!("QMP {command}: {e}")));
        }
        // An event: read on.
    }
}

fn read_object(reader: &mut impl BufRead) -> io::Result<Value> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    serde_json::from_str(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("QMP: {e}")))
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    /// A fake QMP server: greets, answers capabilities, sends an event, answers quit.
    #[test]
    fn quit_negotiates_skips_events_and_sends_quit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            let mut got = Vec::new();
            writeln!(w, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            got.push(line.clone());
            writeln!(w, r#"{{"return": {{}}}}"#).unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            got.push(line);
            writeln!(w, r#"{{"event": "SHUTDOWN", "data": {{}}}}"#).unwrap();
            writeln!(w, r#"{{"return": {{}}}}"#).unwrap();
            got
        });
        quit(&path, Duration::from_secs(5)).unwrap();
        let got = server.join().unwrap();
        assert!(got[0].contains("qmp_capabilities") && got[1].contains("\"quit\""), "{got:?}");
    }

    #[test]
    fn a_server_that_is_not_qmp_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            writeln!(s, r#"{{"hello": 1}}"#).unwrap();
        });
        let err = quit(&path, Duration::from_secs(5)).unwrap_err();
        assert!(err.to_string().contains("not a QMP greeting"), "{err}");
        server.join().unwrap();
    }
}
