//! The QEMU guest agent (`qemu-ga`), spoken over the host end of the VM's
//! `org.qemu.guest_agent.0` channel (a unix socket): blockproof freezes the guest's file
//! systems for the moment the point-in-time view is taken and thaws them right after, so
//! the restore point is file-system consistent (docs/LIVE-VMS.md). Without an agent that
//! answers, the backup is crash-consistent, and says why.
//!
//! The protocol is QMP's JSON lines without a greeting or events. A client cannot know
//! what an earlier client left unread, so every connection starts with
//! `guest-sync-delimited`: a 0xFF byte resets the agent's parser, and the agent puts a
//! 0xFF byte before its answer, so everything before it is stale and skipped. Every read
//! and write has a deadline: a hung agent never hangs the backup, and a freeze whose
//! answer does not come in time is followed by a thaw.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use blockproof_format::Consistency;
use serde_json::{json, Value};

use crate::SourceError;

/// Bounds of the agent's answers.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// Connect, sync and ping: an agent that does not answer within this is absent.
    pub answer: Duration,
    /// `guest-fsfreeze-freeze` (it flushes the guest's dirty data first).
    pub freeze: Duration,
    /// `guest-fsfreeze-thaw`, per try (two tries, the second on a new connection).
    pub thaw: Duration,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts { answer: Duration::from_secs(3), freeze: Duration::from_secs(20), thaw: Duration::from_secs(10) }
    }
}

/// Errors of a guest agent conversation.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot connect to the guest agent socket {path}: {source}")]
    Connect { path: PathBuf, source: std::io::Error },
    #[error("the guest agent at {path} did not answer {what} within {secs} s")]
    Timeout { path: PathBuf, what: String, secs: u64 },
    #[error("guest agent socket {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("guest agent socket {path} does not speak the guest agent protocol: {what}")]
    Protocol { path: PathBuf, what: String },
    #[error("guest agent command {command} failed ({class}): {desc}")]
    Command { command: String, class: String, desc: String },
}

/// An open, synchronised guest agent connection.
pub struct GuestAgent {
    path: PathBuf,
    stream: UnixStream,
    /// Bytes read past the last line.
    pending: Vec<u8>,
    timeouts: Timeouts,
}

impl GuestAgent {
    /// Connects, synchronises (`guest-sync-delimited`) and pings, each within
    /// `timeouts.answer`.
    pub fn connect(path: &Path, timeouts: Timeouts) -> Result<GuestAgent, AgentError> {
        let stream =
            UnixStream::connect(path).map_err(|source| AgentError::Connect { path: path.to_path_buf(), source })?;
        let mut agent = GuestAgent { path: path.to_path_buf(), stream, pending: Vec::new(), timeouts };
        agent.sync()?;
        agent.execute("guest-ping", timeouts.answer)?;
        Ok(agent)
    }

    fn io(&self, source: std::io::Error) -> AgentError {
        AgentError::Io { path: self.path.clone(), source }
    }

    fn send(&mut self, bytes: &[u8], deadline: Instant, what: &str) -> Result<(), AgentError> {
        let left = self.left(deadline, what)?;
        self.stream.set_write_timeout(Some(left)).map_err(|e| self.io(e))?;
        self.stream.write_all(bytes).map_err(|e| self.timeout_or(e, what))
    }

    fn left(&self, deadline: Instant, what: &str) -> Result<Duration, AgentError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.timeout(what));
        }
        Ok(left)
    }

    fn timeout(&self, what: &str) -> AgentError {
        let secs = match what {
            "guest-fsfreeze-freeze" => self.timeouts.freeze,
            "guest-fsfreeze-thaw" => self.timeouts.thaw,
            _ => self.timeouts.answer,
        };
        AgentError::Timeout { path: self.path.clone(), what: what.into(), secs: secs.as_secs_f64().ceil() as u64 }
    }

    fn timeout_or(&self, e: std::io::Error, what: &str) -> AgentError {
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => self.timeout(what),
            _ => self.io(e),
        }
    }

    /// Reads more bytes into `pending`, by `deadline`.
    fn fill(&mut self, deadline: Instant, what: &str) -> Result<(), AgentError> {
        let left = self.left(deadline, what)?;
        self.stream.set_read_timeout(Some(left)).map_err(|e| self.io(e))?;
        let mut buf = [0u8; 4096];
        let n = self.stream.read(&mut buf).map_err(|e| self.timeout_or(e, what))?;
        if n == 0 {
            return Err(AgentError::Protocol { path: self.path.clone(), what: "the connection was closed".into() });
        }
        self.pending.extend_from_slice(&buf[..n]);
        Ok(())
    }

    /// The next non-empty line as JSON, by `deadline`.
    fn read(&mut self, deadline: Instant, what: &str) -> Result<Value, AgentError> {
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                let text = String::from_utf8_lossy(&line);
                if text.trim().is_empty() {
                    continue;
                }
                return serde_json::from_str(text.trim()).map_err(|e| AgentError::Protocol {
                    path: self.path.clone(),
                    what: format!("not JSON ({e}): {}", text.trim()),
                });
            }
            self.fill(deadline, what)?;
        }
    }

    /// `guest-sync-delimited`: everything before the agent's 0xFF is stale.
    fn sync(&mut self) -> Result<(), AgentError> {
        let what = "guest-sync-delimited";
        let deadline = Instant::now() + self.timeouts.answer;
        let id = u64::from(std::process::id()) << 20
            ^ u64::from(
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_micros(),
            );
        let mut msg = vec![0xFF];
        msg.extend(serde_json::to_vec(&json!({"execute": what, "arguments": {"id": id}})).expect("serializes"));
        msg.push(b'\n');
        self.send(&msg, deadline, what)?;
        loop {
            if let Some(at) = self.pending.iter().position(|&b| b == 0xFF) {
                self.pending.drain(..=at);
                break;
            }
            self.pending.clear();
            self.fill(deadline, what)?;
        }
        let reply = self.read(deadline, what)?;
        if reply.get("return").and_then(Value::as_u64) != Some(id) {
            return Err(AgentError::Protocol { path: self.path.clone(), what: format!("{what} answered {reply}") });
        }
        Ok(())
    }

    /// Runs `command`; its `return` value within `timeout`.
    fn execute(&mut self, command: &str, timeout: Duration) -> Result<Value, AgentError> {
        let deadline = Instant::now() + timeout;
        let mut msg = serde_json::to_vec(&json!({ "execute": command })).expect("serializes");
        msg.push(b'\n');
        self.send(&msg, deadline, command)?;
        let mut reply = self.read(deadline, command)?;
        if let Some(r) = reply.get_mut("return") {
            return Ok(r.take());
        }
        if let Some(e) = reply.get("error") {
            return Err(AgentError::Command {
                command: command.into(),
                class: e["class"].as_str().unwrap_or("?").into(),
                desc: e["desc"].as_str().unwrap_or("?").into(),
            });
        }
        Err(AgentError::Protocol { path: self.path.clone(), what: format!("unexpected reply to {command}: {reply}") })
    }

    /// Freezes the guest's file systems; how many.
    pub fn freeze(&mut self) -> Result<u64, AgentError> {
        let n = self.execute("guest-fsfreeze-freeze", self.timeouts.freeze)?;
        Ok(n.as_u64().unwrap_or(0))
    }

    /// Thaws the guest's file systems; how many were frozen.
    pub fn thaw(&mut self) -> Result<u64, AgentError> {
        let n = self.execute("guest-fsfreeze-thaw", self.timeouts.thaw)?;
        Ok(n.as_u64().unwrap_or(0))
    }
}

/// Thaws through `agent`, and if that fails (a timeout leaves the connection in an
/// unknown state) once more on a new connection.
fn thaw(path: &Path, mut agent: GuestAgent) -> Result<u64, AgentError> {
    let timeouts = agent.timeouts;
    agent.thaw().or_else(|_| GuestAgent::connect(path, timeouts)?.thaw())
}

/// Runs `moment` (taking the point-in-time view) with the guest's file systems frozen,
/// when the agent at `path` answers; thaws right after, whatever `moment` returned.
/// `journal(true)` is called before the freeze, `journal(false)` once thawed, so a run
/// killed in between leaves a journal that says to thaw. Returns `moment`'s value and the
/// consistency reached, with the reason when it is not `Frozen`; an error of `moment`,
/// or a thaw that failed twice, is the error (the journal then still says frozen).
pub fn with_frozen<T>(
    path: Option<&Path>,
    timeouts: Timeouts,
    journal: &mut dyn FnMut(bool) -> Result<(), SourceError>,
    moment: impl FnOnce() -> Result<T, SourceError>,
) -> Result<(T, Consistency, Option<String>), SourceError> {
    let Some(path) = path else {
        return moment().map(|v| (v, Consistency::Crash, Some("no guest agent socket given (qga=PATH)".into())));
    };
    let mut agent = match GuestAgent::connect(path, timeouts) {
        Ok(a) => a,
        Err(e) => return moment().map(|v| (v, Consistency::Crash, Some(format!("no guest agent: {e}")))),
    };
    journal(true)?;
    if let Err(e) = agent.freeze() {
        // A disabled or unknown command froze nothing; otherwise the agent may have frozen
        // some file systems before it failed or went silent.
        let refused = matches!(&e, AgentError::Command { class, .. } if class == "CommandNotFound");
        if refused || thaw(path, agent).is_ok() {
            journal(false)?;
        }
        let v = moment()?;
        return Ok((v, Consistency::Crash, Some(format!("the guest agent did not freeze the file systems: {e}"))));
    }
    let result = moment();
    let thawed = thaw(path, agent);
    match thawed {
        Ok(_) => journal(false)?,
        Err(e) => {
            return Err(SourceError::Qemu(format!(
                "the guest's file systems could not be thawed through {}: {e}",
                path.display()
            )))
        }
    }
    result.map(|v| (v, Consistency::Frozen, None))
}

#[cfg(test)]
mod tests;
